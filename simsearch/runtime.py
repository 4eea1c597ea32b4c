"""Where a stage runs: the devices a GPU or CPU offers, the Lightning Trainer (accelerator, devices, nodes, strategy, precision) from
`cfg.trainer`, and the ranks of a launcher (torchrun) for the stages that run without a Trainer."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from simsearch.errors import SimsearchError

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


def say(line: str) -> None:
    """One line for the user on stdout, printed above any progress bar instead of through it."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)


def phase_bar(iterable: Any, description: str, total: int | None = None, unit: str = "it",
              shown: bool = True) -> Any:
    """A tqdm bar (rate, time left) over a phase outside Lightning (evaluating, merging): drawn only on a
    terminal and only once the phase has run 2 s, then removed, so short runs, pipes and logs stay clean."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, total=total, unit=unit, delay=2, leave=False, disable=None if shown else True,
                dynamic_ncols=True)


def phase_progress_bar() -> Any:
    """Lightning's tqdm bar, one bar per phase with rate and time left: "embedding" for predict, and one
    "training" bar over every epoch (its time left is for the whole run, an upper bound under early
    stopping); no sanity-check or validation bars (each epoch's validation is one line, see `say`).
    Made here, not at import: `simsearch search` must not import Lightning."""
    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf

    class PhaseProgressBar(TQDMProgressBar):
        @property
        def predict_description(self) -> str:
            return "embedding"

        def on_predict_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
                                   dataloader_idx: int = 0) -> None:
            if self.has_dataloader_changed(dataloader_idx):  # Lightning's, without " DataLoader 0" in the name
                bar = self.predict_progress_bar
                bar.reset(total=convert_inf(self.total_predict_batches_current_dataloader))
                bar.initial = 0
                bar.set_description(self.predict_description)

        def init_sanity_tqdm(self) -> Tqdm:
            return Tqdm(disable=True)

        def init_validation_tqdm(self) -> Tqdm:
            return Tqdm(disable=True)

        def on_train_epoch_start(self, trainer: Any, *_: Any) -> None:
            per_epoch, epochs = convert_inf(self.total_train_batches), trainer.max_epochs
            bar = self.train_progress_bar
            if per_epoch is None or not epochs or epochs < 0:  # an unknown length: Lightning's bar per epoch
                return super().on_train_epoch_start(trainer, *_)
            if bar.total != per_epoch * epochs:  # the first epoch of this run (a resumed run starts later)
                bar.reset(total=per_epoch * epochs)
                bar.initial = bar.n = trainer.current_epoch * per_epoch
            bar.set_description(f"training, epoch {trainer.current_epoch + 1}/{epochs}")

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            per_epoch = convert_inf(self.total_train_batches)
            if per_epoch is None or not trainer.max_epochs or trainer.max_epochs < 0:
                return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            bar = self.train_progress_bar
            n = trainer.current_epoch * per_epoch + batch_idx + 1
            if self._should_update(n, bar.total):
                bar.n = n
                bar.refresh()
                bar.set_postfix(self.get_metrics(trainer, pl_module))

        def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
            metrics = super().get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)
            return metrics

    return PhaseProgressBar()


CPU_PROCESSES_PER_CORE = 4  # DDP on CPUs: one process per "device"; more than this per core is a typo


def device_count(devices: Any) -> int | None:
    """How many devices `trainer.devices` asks for (None: auto or -1, all of them)."""
    if isinstance(devices, int):
        return None if devices == -1 else devices
    if isinstance(devices, str):
        return None if devices in ("auto", "-1") else len([d for d in devices.split(",") if d.strip()])
    return len(devices)


def check_device_count(trainer_cfg: DictConfig) -> None:
    """No more processes than the machine has devices: on a CPU, Lightning starts one per 'device' asked
    for (trainer.devices=100000 would start 100,000 processes)."""
    import torch

    wanted = device_count(trainer_cfg.devices)
    on_gpu = trainer_cfg.accelerator in ("gpu", "cuda") or (trainer_cfg.accelerator == "auto" and torch.cuda.is_available())
    if wanted is None:
        return
    if on_gpu and wanted > torch.cuda.device_count():
        raise SimsearchError(f"trainer.devices={trainer_cfg.devices} asks for {wanted} GPUs; this machine has "
                             f"{torch.cuda.device_count()}: use trainer.devices=auto")
    cores = os.cpu_count() or 1
    if not on_gpu and wanted > CPU_PROCESSES_PER_CORE * cores:
        raise SimsearchError(f"trainer.devices={trainer_cfg.devices} would start {wanted} processes on {cores} CPU "
                             f"cores (at most {CPU_PROCESSES_PER_CORE} per core): use trainer.devices=auto")


def build_trainer(cfg: DictConfig, callbacks: list, **extra: Any) -> L.Trainer:
    """A Trainer from `cfg.trainer`: devices, nodes, strategy (DDP, SLURM detected by Lightning), precision."""
    import lightning as L

    trainer = cfg.trainer
    check_device_count(trainer)
    return L.Trainer(
        accelerator=trainer.accelerator,
        devices=trainer.devices,
        num_nodes=trainer.num_nodes,
        strategy=trainer.strategy,
        precision=resolve_precision(trainer),
        callbacks=[*callbacks, *([phase_progress_bar()] if trainer.enable_progress_bar else [])],
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


def cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch (~2 s) on a machine with no GPU driver at all."""
    driver_files = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd")  # NVIDIA, or ROCm (torch.cuda too)
    if "torch" not in sys.modules and not any(os.path.exists(path) for path in driver_files):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device in ("gpu", "cuda") and not cuda_available():
        raise SimsearchError(f"device={device} was asked for, but torch sees no GPU")
    return "cuda" if device in ("gpu", "cuda") else device


def filter_library_warnings() -> None:
    """Known harmless warnings and library banners off (the CLI, and the Python API in notebooks)."""
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*predict_dataloader.*num_workers.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto in a kernel without ipywidgets
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")  # a resumed run
    warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
