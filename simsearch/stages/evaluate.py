"""`simsearch eval`: the retrieval metrics of the store in run.dir (`simsearch.evaluation`), printed,
written to metrics.json and logged."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from simsearch.config import save_config
from simsearch.errors import SimsearchError
from simsearch.evaluation import evaluate_store, store_identity
from simsearch.files import write_json_atomically
from simsearch.metrics import metrics_table
from simsearch.runtime import join_launched_ranks
from simsearch.store import Store
from simsearch.tracking import finish, log_metrics, start_run


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Retrieval metrics of the store in run.dir (leave-one-out, or against the store in eval.gallery):
    metrics.json in run.dir, a table, and W&B."""
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


