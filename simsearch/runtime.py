"""Where a stage runs: the Lightning Trainer (accelerator, devices, nodes, strategy, precision) from `cfg.trainer`."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig


def resolve_precision(trainer_cfg: DictConfig) -> str:
    """`trainer.precision`, or bf16-mixed on a GPU and 32-true on a CPU when it is null."""
    if trainer_cfg.precision:
        return trainer_cfg.precision
    on_gpu = torch.cuda.is_available() and trainer_cfg.accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if on_gpu else "32-true"


def build_trainer(cfg: DictConfig, callbacks: list, **extra: Any) -> L.Trainer:
    """A Trainer from `cfg.trainer`: devices, nodes, strategy (DDP, SLURM detected by Lightning), precision."""
    trainer = cfg.trainer
    return L.Trainer(
        accelerator=trainer.accelerator,
        devices=trainer.devices,
        num_nodes=trainer.num_nodes,
        strategy=trainer.strategy,
        precision=resolve_precision(trainer),
        callbacks=callbacks,
        enable_progress_bar=trainer.enable_progress_bar,
        enable_model_summary=False,
        **{"logger": False, "enable_checkpointing": False, **extra},
    )
