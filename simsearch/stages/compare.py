"""`simsearch compare`: the frozen baseline and fine-tuned models on the same test split, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from simsearch.drawing import compared_models, comparison_chart
from simsearch.errors import SimsearchError
from simsearch.evaluation import evaluate_store
from simsearch.extraction import extract_store
from simsearch.files import write_json_atomically
from simsearch.metrics import metric_names
from simsearch.model import checkpoint_metadata
from simsearch.store import Store
from simsearch.tracking import finish, log_metrics, start_run
from simsearch.training import LOSSES, base_model_config, extract_or_reuse, project_store
from simsearch.training import fit as train


def compare(cfg: DictConfig) -> dict[str, Any]:
    """The frozen baseline and every fine-tuned model on the same split: one table, JSON, chart, W&B group."""
    if cfg.data.split == "train":
        raise SimsearchError("compare evaluates on data.split=test: the train split is what fine-tuning learnt from")
    checkpoints = compared_checkpoints(cfg)
    out = Path(cfg.run.dir)
    base_cfg = base_model_config(cfg, checkpoints[0])
    check_same_start(checkpoints)
    baseline = extract_or_reuse(OmegaConf.merge(base_cfg, {"run": {"dir": str(out / "baseline")}, "store": {"dtype": "float32"}}))
    models = [{"name": "baseline", "description": f"{base_cfg.model.name} ({base_cfg.model.weights} weights), frozen",
               "checkpoint": None, "store": baseline, "cfg": base_cfg}]
    for checkpoint, name in zip(checkpoints, model_names(checkpoints)):
        models.append(tuned_model(cfg, checkpoint, name, baseline, out))
    group = cfg.logger.wandb.group or f"compare-{cfg.data.name}-{cfg.data.split}"
    for model in models:
        model["metrics"] = evaluate_store(model["store"], cfg.eval, cfg.index, cfg.run.seed)
        write_json_atomically(model["store"].dir / "metrics.json", model["metrics"])
        run = start_run(OmegaConf.merge(model["cfg"], {"logger": {"wandb": {"group": group}}}), "eval",
                        name=f"{model['name']}-{out.name}")
        log_metrics(run, model["metrics"], prefix="test/")
        finish(run)
    ks, knn_ks = list(models[0]["metrics"]["k"]), list(models[0]["metrics"].get("knn_k", []))
    comparison = comparison_record(cfg, models, len(baseline))
    write_json_atomically(out / "comparison.json", comparison)
    chart = out / cfg.compare.chart
    comparison_chart(comparison, ks, chart, knn_ks)
    print(comparison_table(comparison, ks, knn_ks))
    print(f"Saved: {out / 'comparison.json'}, {chart}")
    return comparison


def compared_checkpoints(cfg: DictConfig) -> list[Path]:
    """The checkpoints given (compare.checkpoints, or the one compare.checkpoint), else one fine-tuning run per loss
    of compare.losses (none: finetune.loss) and value of compare.unfreeze (0: the head only), each with finetune.*:
    frozen, label-free and supervised heads and end to end in one command."""
    given = [*([cfg.compare.checkpoint] if cfg.compare.checkpoint else []), *cfg.compare.checkpoints]
    if given:
        missing = [str(path) for path in given if not Path(path).is_file()]
        if missing:
            raise SimsearchError(f"compare: no checkpoint file at {', '.join(missing)}: give the best_checkpoint "
                                 "that `simsearch finetune` printed, or leave compare.checkpoints empty to train")
        return [Path(path) for path in given]
    checkpoints, values = [], list(cfg.compare.unfreeze or [cfg.finetune.unfreeze])
    losses = list(cfg.compare.losses or [cfg.finetune.loss])
    for loss in losses:
        for unfreeze in values:
            name = training_name(cfg, loss, int(unfreeze), several=len(values) > 1, several_losses=len(losses) > 1)
            run = OmegaConf.merge(cfg, {"finetune": {"loss": loss, "unfreeze": int(unfreeze), "name": name}})
            trained = train(run).get("best_checkpoint")
            if not trained:
                raise SimsearchError(f"fine-tuning with finetune.loss={loss} finetune.unfreeze={unfreeze} kept no checkpoint")
            checkpoints.append(Path(trained))
    return checkpoints


def training_name(cfg: DictConfig, loss: str, unfreeze: int, several: bool, several_losses: bool = False) -> str:
    """finetune.name for one of compare's training runs: the default name follows the loss and unfreeze; a name the
    user gave gets '-<loss>' and '-unfreezeN' when compare trains several, so their checkpoints never share a folder."""
    ft = cfg.finetune
    if ft.name == f"{cfg.data.name}-{ft.loss}-unfreeze{ft.unfreeze}":
        return f"{cfg.data.name}-{loss}-unfreeze{unfreeze}"
    return f"{ft.name}{f'-{loss}' if several_losses else ''}{f'-unfreeze{unfreeze}' if several else ''}"


def check_same_start(checkpoints: list[Path]) -> None:
    """Every fine-tuned model must start from the same frozen backbone: it is the baseline they are compared with."""
    first = checkpoint_metadata(checkpoints[0])["backbone"]
    for checkpoint in checkpoints[1:]:
        if checkpoint_metadata(checkpoint)["backbone"] != first:
            raise SimsearchError(f"compare: {checkpoint} was fine-tuned from another backbone than {checkpoints[0]}: "
                                 "compare models that started from the same one (or run compare once per backbone)")


def model_names(checkpoints: list[Path]) -> list[str]:
    """'head' (unfreeze=0) or 'end-to-end', 'label-free-' before either for a label-free loss; the checkpoint's
    folder is added where two would share a name."""
    kinds = [model_kind(checkpoint_metadata(path)) for path in checkpoints]
    names = [kind if kinds.count(kind) == 1 else f"{kind}-{path.parent.name}" for kind, path in zip(kinds, checkpoints)]
    return [name if names.count(name) == 1 else f"{name}-{i}" for i, name in enumerate(names, start=1)]


def model_kind(meta: dict[str, Any]) -> str:
    kind = "head" if meta["unfreeze"] == 0 else "end-to-end"
    loss = LOSSES.get(meta["loss"])  # a loss no longer registered: named as a supervised one
    return f"label-free-{kind}" if loss is not None and not loss.needs_labels else kind


def tuned_model(cfg: DictConfig, checkpoint: Path, name: str, baseline: Store, out: Path) -> dict[str, Any]:
    """A fine-tuned model's store: the head applied to the baseline's features when the backbone stayed frozen
    (no second pass over the images), else a fresh extraction through backbone and head."""
    meta = checkpoint_metadata(checkpoint)
    tuned_cfg = OmegaConf.merge(cfg, {"run": {"dir": str(out / name)}, "model": {"checkpoint": str(checkpoint)}})
    if meta["unfreeze"] == 0:
        store = project_store(baseline, checkpoint, out / name, tuned_cfg)
    else:
        extract_store(tuned_cfg)
        store = Store.open(out / name)
    groups = f"{meta['unfreeze']} backbone group{'s' if meta['unfreeze'] != 1 else ''} unfrozen"
    return {"name": name, "description": f"{meta['backbone']['name']} + head, {meta['loss']} loss, {groups}",
            "checkpoint": str(checkpoint), "store": store, "cfg": tuned_cfg}


def comparison_record(cfg: DictConfig, models: list[dict[str, Any]], items: int) -> dict[str, Any]:
    """comparison.json: every model's scalar metrics under "models"; "baseline", "finetuned" and "difference"
    keep the first fine-tuned model's figures where a two-model comparison had them."""
    scalars = [k for k, v in models[0]["metrics"].items() if isinstance(v, float)]
    rows = [{"name": m["name"], "description": m["description"], "checkpoint": m["checkpoint"],
             "metrics": {k: m["metrics"][k] for k in scalars}} for m in models]
    base, first = rows[0]["metrics"], rows[1]["metrics"]
    return {
        "data": {"name": cfg.data.name, "split": cfg.data.split, "limit": cfg.data.limit, "items": items},
        "models": rows,
        "checkpoint": rows[1]["checkpoint"], "baseline_weights": models[0]["cfg"].model.weights,
        "baseline_model": rows[0]["description"].removesuffix(", frozen"), "finetuned_model": rows[1]["description"],
        "baseline": base, "finetuned": first, "difference": {k: first[k] - base[k] for k in scalars},
    }


def comparison_table(comparison: dict[str, Any], ks: list[int], knn_ks: list[int] | None = None) -> str:
    """A column per model; with two, the change too."""
    models = compared_models(comparison)
    names = metric_names(ks, knn_ks or [])
    first = max(len("metric"), *map(len, names))  # knn_accuracy@10 is longer than the other names
    width = max(11, *(len(name) + 2 for name, _ in models))
    change = "change".rjust(9) if len(models) == 2 else ""
    lines = ["metric".ljust(first) + "".join(name.rjust(width) for name, _ in models) + change]
    for metric in names:
        values = [scores[metric] for _, scores in models]
        change = f"{values[1] - values[0]:>+9.4f}" if len(models) == 2 else ""
        lines.append(metric.ljust(first) + "".join(f"{v:>{width}.4f}" for v in values) + change)
    return "\n".join(lines)
