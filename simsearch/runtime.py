"""Where a stage runs: the Lightning Trainer (accelerator, devices, nodes, strategy, precision) from
`cfg.trainer`, and the ranks of a launcher (torchrun) for the stages that run without a Trainer."""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

if TYPE_CHECKING:
    import lightning as L

log = logging.getLogger(__name__)
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # torchrun's env:// convention


def resolve_precision(trainer_cfg: DictConfig) -> str:
    """`trainer.precision`, or bf16-mixed on a GPU and 32-true on a CPU when it is null."""
    import torch

    if trainer_cfg.precision:
        return trainer_cfg.precision
    on_gpu = torch.cuda.is_available() and trainer_cfg.accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if on_gpu else "32-true"


def build_trainer(cfg: DictConfig, callbacks: list, **extra: Any) -> L.Trainer:
    """A Trainer from `cfg.trainer`: devices, nodes, strategy (DDP, SLURM detected by Lightning), precision."""
    import lightning as L

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


def join_launched_ranks(timeout_minutes: float = 10.0) -> tuple[int, int, int] | None:
    """(global rank, world size, local rank) when a launcher started this process as one of several
    (torchrun, or srun with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT exported, torchrun's env://
    convention); the process group is joined here (NCCL on GPUs, gloo otherwise). None for a lone process.
    SLURM's own variables alone are not trusted: a batch script's single process carries them too."""
    if not all(os.environ.get(name) for name in LAUNCHER_VARIABLES):
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return None
    if world < 2:
        return None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        log.info("joining %d ranks as rank %d (%s, %s:%s)", world, rank, backend, os.environ["MASTER_ADDR"],
                 os.environ["MASTER_PORT"])
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return rank, world, local
