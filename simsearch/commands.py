"""The CLI's commands other than extract: each reads the store in `run.dir` and writes beside it."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image

from simsearch.config import save_config
from simsearch.errors import SimsearchError
from simsearch.images import UnreadableImage
from simsearch.store import Store, write_json_atomically
from simsearch.tracking import finish, log_image, log_metrics, start_run

log = logging.getLogger(__name__)


def index(cfg: DictConfig) -> dict[str, Any]:
    """Build and save `index.faiss` (and `index.json`) for the store in run.dir."""
    from simsearch.index import build_index, save_index

    store = Store.open(cfg.run.dir)
    built, info = build_index(store, cfg.index, cfg.run.seed)
    save_index(built, info, store.dir)
    print(f"index {info['factory']} over {info['ntotal']} vectors (dim {info['dim']}) built in "
          f"{info['build_seconds']:.2f} s: {store.dir / 'index.faiss'}")
    return info


def eval(cfg: DictConfig) -> dict[str, Any]:  # noqa: A001 - the command is called eval
    """Retrieval metrics of the store in run.dir (leave-one-out, or against the store in eval.gallery):
    metrics.json in run.dir, a table, and W&B."""
    from simsearch.evaluate import evaluate_store, metrics_table, store_identity
    from simsearch.runtime import join_launched_ranks

    store = Store.open(cfg.run.dir)
    gallery = Store.open(cfg.eval.gallery) if cfg.eval.gallery else None
    ranks = join_launched_ranks()  # under torchrun: the exact search's blocks shared among the ranks
    metrics = evaluate_store(store, cfg.eval, cfg.index, cfg.run.seed, gallery=gallery, ranks=ranks)
    if ranks and ranks[0] != 0:  # every rank searched its share; global rank 0 alone writes and logs
        return metrics
    if ranks:
        metrics["ranks"] = ranks[1]
    run = start_run(cfg, "eval")
    metrics["store"] = {**store_identity(store), **{k: store.manifest.get(k) for k in ("weights", "image_size")},
                        "checkpoint": store.manifest.get("model", {}).get("checkpoint")}
    print(metrics_table(metrics))  # first: a run.dir that cannot be written loses nothing
    log_metrics(run, metrics, prefix="test/")
    if run is not None:  # what was evaluated against what, beside the numbers
        run.summary.update({"test/protocol": metrics["protocol"], "test/gallery": metrics.get("gallery", {}).get("dir"),
                            "test/query_sample": metrics.get("query_sample"), "test/search": metrics["search"]})
    finish(run)
    try:
        write_json_atomically(store.dir / "metrics.json", metrics)
        save_config(cfg, store.dir / "eval_config.yaml")
    except OSError as error:
        raise SimsearchError(f"the metrics above could not be saved in {store.dir} ({error.strerror or error}): "
                             "make run.dir writable, or evaluate a copy of the store") from None
    print(f"Saved metrics: {store.dir / 'metrics.json'}")
    return metrics


def search(cfg: DictConfig) -> Any:
    """Top-K of `search.query` (an item id/row, a .npy vector or an image file), printed and drawn as a grid.

    Only a search by image file imports torch and loads the model; the W&B run starts after the answer.
    """
    from simsearch.index import open_searcher
    from simsearch.search import (
        ItemImages,
        QueryEncoder,
        draw_grid,
        resolve_query,
        result_table,
        search_image,
        search_item,
        search_vector,
    )

    if cfg.search.query is None:
        raise SimsearchError("say what to search for: query=ID (an item of the store), query=PATH (an image file) "
                             "or query=VECTOR.npy")
    store = Store.open(cfg.run.dir)
    kind, target = resolve_query(store, str(cfg.search.query))
    searcher = open_searcher(store, single_query_index(cfg.index), cfg.run.seed)
    pixels = ItemImages(store)
    if kind == "item":
        result = search_item(store, searcher, target, cfg.search.k)
        query_image, caption = None, f"{result.query['id']} ({result.query['label']})"
        print(f"Query Image Index: {target}  id: {result.query['id']}  label: {result.query['label']}")
    elif kind == "vector":
        result = search_vector(store, searcher, target, cfg.search.k)
        query_image, caption = Image.new("RGB", (32, 32), "lightgrey"), Path(str(cfg.search.query)).name
        print(f"Query vector: {cfg.search.query}")
    else:
        query_image = read_query_image(target)
        result = search_image(store, searcher, QueryEncoder(store.manifest), query_image, cfg.search.k, str(target))
        caption = Path(target).name
        print(f"Query image: {target}")
    tiles = [pixels.image_or_placeholder(n.row) for n in result.neighbours] if pixels.records_images else []
    print(result_table(result, [reason for _, reason in tiles] or None), flush=True)
    if result.precision is not None:
        print(f"Precision@{cfg.search.k}: {result.precision:.2f}", flush=True)
    grid = None
    if not pixels.records_images:  # the answer stands without its picture
        log.warning("no grid drawn: the store %s records no images, only vectors", store.dir)
    else:
        if kind == "item":
            query_image, missing = pixels.image_or_placeholder(target)
            if missing:
                log.warning("the query's image cannot be shown: %s", missing)
        grid = draw_grid(query_image, caption, result, [image for image, _ in tiles])
    grid_path = store.dir / cfg.search.grid
    if grid is not None:
        grid.save(grid_path)
        print(f"Saved image: {grid_path}")
    run = start_run(cfg, "search")
    if grid is not None:
        log_image(run, "search/recommendations", grid_path, caption)
    if run is not None and result.precision is not None:
        run.summary[f"search/precision@{cfg.search.k}"] = result.precision
    finish(run)
    return result


def duplicates(cfg: DictConfig) -> list[list[str]]:
    """Groups of near-identical items (or, with duplicates.against, leakage into another store)."""
    from simsearch.duplicates import duplicates as find

    return find(cfg)


def map(cfg: DictConfig) -> Path:  # noqa: A001 - the command is called map
    """The store's embeddings in 2-D, coloured by label: embedding_map.png, logged to W&B."""
    from simsearch.embedding_map import embedding_map

    return embedding_map(cfg)


def single_query_index(index_cfg: DictConfig) -> DictConfig:
    """index.device=auto means the CPU for one query: the saved index is memory-mapped there, and a GPU
    would first need the whole store copied to it (and torch imported)."""
    return OmegaConf.merge(index_cfg, {"device": "cpu"}) if index_cfg.device == "auto" else index_cfg


def read_query_image(path: Path) -> Image.Image:
    from simsearch.images import decode_image

    try:
        return decode_image(path)
    except UnreadableImage as error:
        raise SimsearchError(f"cannot read the query image {path}: {error}") from None


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Train a projection head (and optionally the last stages); the best checkpoint goes to checkpoints/."""
    from simsearch.finetune import finetune as train

    return train(cfg)


COMPARED = ("hit@{k}", "precision@{k}", "recall@{k}", "map@{k}")


def compare(cfg: DictConfig) -> dict[str, Any]:
    """Baseline and fine-tuned model on the same split: metrics side by side, JSON, chart, W&B group."""
    from omegaconf import OmegaConf

    from simsearch.evaluate import evaluate_store
    from simsearch.finetune import base_model_config, checkpoint_metadata, extract_or_reuse, project_store
    from simsearch.finetune import finetune as train

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
    if checkpoint_metadata(checkpoint)["unfreeze"] == 0:
        tuned = project_store(baseline, checkpoint, out / "finetuned", tuned_cfg)
    else:
        from simsearch.extract import extract

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
        "baseline": {k: results["baseline"][k] for k in scalars},
        "finetuned": {k: results["finetuned"][k] for k in scalars},
        "difference": {k: results["finetuned"][k] - results["baseline"][k] for k in scalars},
    }
    write_json_atomically(out / "comparison.json", comparison)
    chart = out / cfg.compare.chart
    comparison_chart(comparison, list(results["baseline"]["k"]), chart)
    print(comparison_table(comparison, list(results["baseline"]["k"])))
    print(f"Saved: {out / 'comparison.json'}, {chart}")
    return comparison


def comparison_table(comparison: dict[str, Any], ks: list[int]) -> str:
    names = [n.format(k=k) for k in ks for n in COMPARED] + ["map@r", "r_precision"]
    lines = [f"{'metric':<14}{'baseline':>10}{'finetuned':>11}{'change':>9}"]
    for name in names:
        b, f = comparison["baseline"][name], comparison["finetuned"][name]
        lines.append(f"{name:<14}{b:>10.4f}{f:>11.4f}{f - b:>+9.4f}")
    return "\n".join(lines)


def comparison_chart(comparison: dict[str, Any], ks: list[int], path: Path) -> None:
    """Grouped bars: hit@K, P@K, R@K, mAP@K for every K, MAP@R and R-precision, baseline beside fine-tuned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [n.format(k=k) for n in COMPARED for k in ks] + ["map@r", "r_precision"]
    x = np.arange(len(names))
    figure, axes = plt.subplots(figsize=(max(8, len(names) * 0.7), 4.5))
    for offset, (label, key) in ((-0.2, ("baseline", "baseline")), (0.2, ("fine-tuned", "finetuned"))):
        axes.bar(x + offset, [comparison[key][n] for n in names], width=0.4, label=label)
    axes.set_xticks(x, names, rotation=45, ha="right")
    axes.set_ylim(0, 1)
    axes.set_ylabel("score")
    data = comparison["data"]
    axes.set_title(f"{data['name']} {data['split']} ({data['items']} items): baseline vs fine-tuned")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def serve(cfg: DictConfig) -> None:
    """JSON API and web page over the store in run.dir (uvicorn, 127.0.0.1:8000 by default)."""
    from simsearch.serve import serve as run_server

    run_server(cfg)
