"""`simsearch extract`: embed a collection into the store in run.dir (`simsearch.extraction`), then say
what was embedded and log it."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from simsearch.extraction import extract_store
from simsearch.tracking import finish, log_metrics, start_run


def extract(cfg: DictConfig) -> dict[str, Any]:
    """The store's manifest (on every rank); the store in run.dir replaced only once the new one is complete."""
    return extract_store(cfg, after=lambda manifest: log_extraction(cfg, manifest))


def log_extraction(cfg: DictConfig, manifest: dict[str, Any]) -> None:
    """The store's size and what was skipped, under the run's resolved config, to W&B."""
    run = start_run(cfg, "extract")
    log_metrics(run, {key: manifest[key] for key in ("count", "skipped", "dim", "embedded", "reused")}, prefix="extract/")
    finish(run)
    print(f"store of {manifest['count']} items (dim {manifest['dim']}, {manifest['skipped']} skipped; "
          f"embedded {manifest['embedded']}, reused {manifest['reused']}): {cfg.run.dir}")
