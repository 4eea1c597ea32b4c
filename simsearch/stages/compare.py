"""`simsearch compare`: the frozen baseline and fine-tuned models on the same test split, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from simsearch.drawing import comparison_chart
from simsearch.errors import SimsearchError
from simsearch.files import write_json_atomically
from simsearch.metrics import metric_names
from simsearch.stages.evaluate import evaluate_store
from simsearch.stages.extract import extract
from simsearch.stages.finetune import base_model_config, checkpoint_metadata, extract_or_reuse, project_store
from simsearch.stages.finetune import finetune as train
from simsearch.store import Store
from simsearch.tracking import finish, log_metrics, start_run

COMPARED = ("hit@{k}", "precision@{k}", "recall@{k}", "map@{k}")


def compare(cfg: DictConfig) -> dict[str, Any]:
    """Baseline and fine-tuned model on the same split: metrics side by side, JSON, chart, W&B group."""
    if cfg.data.split == "train":
        raise SimsearchError("compare evaluates on data.split=test: the train split is what fine-tuning learnt from")
    checkpoint = cfg.compare.checkpoint or train(cfg).get("best_checkpoint")
    if not checkpoint:
        raise SimsearchError("fine-tuning kept no checkpoint to compare")
    checkpoint = Path(checkpoint)
    out = Path(cfg.run.dir)
    base_cfg = base_model_config(cfg, checkpoint)
    baseline = extract_or_reuse(OmegaConf.merge(base_cfg, {"run": {"dir": str(out / "baseline")}, "store": {"dtype": "float32"}}))
    tuned_cfg = OmegaConf.merge(cfg, {"run": {"dir": str(out / "finetuned")}, "model": {"checkpoint": str(checkpoint)}})
    trained = checkpoint_metadata(checkpoint)
    if trained["unfreeze"] == 0:
        tuned = project_store(baseline, checkpoint, out / "finetuned", tuned_cfg)
    else:
        extract(tuned_cfg)
        tuned = Store.open(out / "finetuned")
    results = {}
    group = cfg.logger.wandb.group or f"compare-{cfg.data.name}-{cfg.data.split}"
    for name, store, run_cfg in (("baseline", baseline, base_cfg), ("finetuned", tuned, tuned_cfg)):
        metrics = evaluate_store(store, cfg.eval, cfg.index, cfg.run.seed)
        write_json_atomically(store.dir / "metrics.json", metrics)
        run = start_run(OmegaConf.merge(run_cfg, {"logger": {"wandb": {"group": group}}}), "eval", name=f"{name}-{out.name}")
        log_metrics(run, metrics, prefix="test/")
        finish(run)
        results[name] = metrics
    scalars = [k for k, v in results["baseline"].items() if isinstance(v, float)]
    comparison = {
        "data": {"name": cfg.data.name, "split": cfg.data.split, "limit": cfg.data.limit, "items": len(baseline)},
        "checkpoint": str(checkpoint), "baseline_weights": base_cfg.model.weights,
        "baseline_model": f"{base_cfg.model.name} ({base_cfg.model.weights} weights)",
        "finetuned_model": f"{base_cfg.model.name} + head, {trained['loss']} loss, "
                           f"{trained['unfreeze']} backbone group{'s' if trained['unfreeze'] != 1 else ''} unfrozen",
        "baseline": {k: results["baseline"][k] for k in scalars},
        "finetuned": {k: results["finetuned"][k] for k in scalars},
        "difference": {k: results["finetuned"][k] - results["baseline"][k] for k in scalars},
    }
    write_json_atomically(out / "comparison.json", comparison)
    chart = out / cfg.compare.chart
    comparison_chart(comparison, list(results["baseline"]["k"]), chart, list(results["baseline"].get("knn_k", [])))
    print(comparison_table(comparison, list(results["baseline"]["k"]), list(results["baseline"].get("knn_k", []))))
    print(f"Saved: {out / 'comparison.json'}, {chart}")
    return comparison


def comparison_table(comparison: dict[str, Any], ks: list[int], knn_ks: list[int] | None = None) -> str:
    names = metric_names(ks, knn_ks or [])
    lines = [f"{'metric':<14}{'baseline':>10}{'finetuned':>11}{'change':>9}"]
    for name in names:
        b, f = comparison["baseline"][name], comparison["finetuned"][name]
        lines.append(f"{name:<14}{b:>10.4f}{f:>11.4f}{f - b:>+9.4f}")
    return "\n".join(lines)


