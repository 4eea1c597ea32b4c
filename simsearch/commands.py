"""The CLI's commands other than extract: each reads the store in `run.dir` and writes beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from simsearch.config import save_config
from simsearch.errors import SimsearchError
from simsearch.store import Store
from simsearch.tracking import finish, log_image, log_metrics, start_run


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
    """Leave-one-out retrieval metrics of the store: metrics.json, a table, and W&B."""
    from simsearch.evaluate import evaluate_store, metrics_table

    store = Store.open(cfg.run.dir)
    run = start_run(cfg, "eval")
    metrics = evaluate_store(store, cfg.eval, cfg.index, cfg.run.seed)
    metrics["store"] = {k: store.manifest.get(k) for k in ("dataset", "split", "weights", "image_size", "count")}
    metrics["store"]["checkpoint"] = store.manifest.get("model", {}).get("checkpoint")
    (store.dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    save_config(cfg, store.dir / "eval_config.yaml")
    print(metrics_table(metrics))
    print(f"Saved metrics: {store.dir / 'metrics.json'}")
    log_metrics(run, metrics, prefix="test/")
    finish(run)
    return metrics


def search(cfg: DictConfig) -> Any:
    """Top-K of `search.query` (an item id/row or an image file), printed and drawn as a grid."""
    from simsearch.data import decode_image
    from simsearch.index import open_searcher
    from simsearch.search import (
        ItemImages,
        QueryEncoder,
        draw_grid,
        resolve_query,
        result_table,
        search_image,
        search_item,
    )

    if cfg.search.query is None:
        raise SimsearchError("say what to search for: query=ID (an item of the store) or query=PATH (an image file)")
    store = Store.open(cfg.run.dir)
    kind, target = resolve_query(store, str(cfg.search.query))
    searcher = open_searcher(store, cfg.index, cfg.run.seed)
    pixels = ItemImages(store)
    if kind == "item":
        result = search_item(store, searcher, target, cfg.search.k)
        query_image, caption = pixels.image(target), f"{result.query['id']} ({result.query['label']})"
        print(f"Query Image Index: {target}  id: {result.query['id']}  label: {result.query['label']}")
    else:
        query_image = decode_image_or_fail(decode_image, target)
        result = search_image(store, searcher, QueryEncoder(store.manifest), query_image, cfg.search.k, str(target))
        caption = Path(target).name
        print(f"Query image: {target}")
    print(result_table(result))
    if result.precision is not None:
        print(f"Precision@{cfg.search.k}: {result.precision:.2f}")
    grid = draw_grid(query_image, caption, result, [pixels.image(n.row) for n in result.neighbours])
    grid_path = store.dir / cfg.search.grid
    grid.save(grid_path)
    print(f"Saved image: {grid_path}")
    run = start_run(cfg, "search")
    log_image(run, "search/recommendations", grid_path, caption)
    if run is not None and result.precision is not None:
        run.summary[f"search/precision@{cfg.search.k}"] = result.precision
    finish(run)
    return result


def decode_image_or_fail(decode, path: Path):
    from simsearch.data import UnreadableImage

    try:
        return decode(path)
    except UnreadableImage as error:
        raise SimsearchError(f"cannot read the query image {path}: {error}") from None
