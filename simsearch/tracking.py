"""Weights & Biases logging: offline by default (no account; `wandb sync` uploads later), off with logger=none."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from simsearch.errors import SimsearchError

log = logging.getLogger(__name__)


def start_run(cfg: DictConfig, job_type: str, name: str | None = None) -> Any | None:
    """A W&B run carrying the resolved config, or None when logging is off.

    Runs share the group `<dataset>-<split>` unless `logger.wandb.group` says otherwise, so a baseline
    and a fine-tuned run of the same test split sit side by side in one W&B report.
    """
    settings = cfg.logger.wandb
    if not settings.enabled or settings.mode == "disabled":
        return None
    if settings.mode not in ("offline", "online"):
        raise SimsearchError(f"logger.wandb.mode must be offline, online or disabled, not '{settings.mode}'")
    import wandb

    directory = settings.dir or cfg.run.dir  # beside the run's outputs: nothing lands in the current folder
    Path(directory).mkdir(parents=True, exist_ok=True)
    try:
        return wandb.init(
            project=settings.project,
            entity=settings.entity,
            group=settings.group or f"{cfg.data.name}-{cfg.data.split}",
            name=settings.name or name or f"{job_type}-{Path(cfg.run.dir).name}",
            job_type=job_type,
            tags=list(settings.tags),
            config=OmegaConf.to_container(cfg, resolve=True),
            dir=directory,
            mode=settings.mode,
            reinit="create_new",
        )
    except Exception as error:  # wandb raises its own types for login and network problems
        raise SimsearchError(
            f"W&B could not start ({error}): run `wandb login`, or use logger.wandb.mode=offline or logger=none"
        ) from None


def log_metrics(run: Any | None, metrics: dict[str, Any], prefix: str = "") -> None:
    """Scalars to the run's history and summary; the per-class table as a W&B Table."""
    if run is None:
        return
    import wandb

    scalars = {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    run.log(scalars)
    run.summary.update(scalars)
    per_class = metrics.get("per_class")
    if per_class:
        columns = ["class", *next(iter(per_class.values())).keys()]
        table = wandb.Table(columns=columns, data=[[c, *row.values()] for c, row in per_class.items()])
        run.log({f"{prefix}per_class": table})


def log_image(run: Any | None, key: str, path: Path, caption: str = "") -> None:
    if run is not None:
        import wandb

        run.log({key: wandb.Image(str(path), caption=caption)})


def finish(run: Any | None) -> None:
    """End the run and say where it is: an offline run is a folder nobody would look for otherwise."""
    if run is None:
        return
    offline = run.settings.mode == "offline"
    folder = Path(run.dir).parent  # wandb/offline-run-<time>-<id>, which `wandb sync` takes
    run.finish()
    if offline:
        print(f"W&B: offline run saved in {folder} (`wandb sync {folder}` uploads it; logger=none writes none)")
    else:
        log.info("W&B run %s written to %s", run.name, folder)
