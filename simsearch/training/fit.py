"""One fine-tuning run: the checks made before any training, the model and its data, `Trainer.fit` with model
selection on the held-out part of the train split, and the summary (`finetune.json`)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from simsearch.data import ImageCollection, Resize, build_collection
from simsearch.errors import SimsearchError
from simsearch.files import write_json_atomically
from simsearch.metrics import metric_names
from simsearch.model import (
    Embedder,
    Preprocess,
    ProjectionHead,
    backbone_spec,
    build_backbone,
    checkpoint_metadata,
    finetune_record,
    read_checkpoint,
    resolve_model_config,
)
from simsearch.runtime import build_trainer
from simsearch.tracking import finish, start_run
from simsearch.training.data import loaders, split_rows
from simsearch.training.features import cached_features
from simsearch.training.losses import LOSSES
from simsearch.training.module import VALIDATION_K, MetricLearningModule, unfrozen_stages

log = logging.getLogger(__name__)


def check_finetune_config(ft: DictConfig, collection: ImageCollection) -> None:
    """Every mistake that would otherwise surface mid-run, as one sentence, before any extraction. The collection's
    labels are read only for a loss that needs them."""
    if ft.loss not in LOSSES:
        raise SimsearchError(f"finetune.loss must be {', '.join(LOSSES)}, not '{ft.loss}'")
    if ft.loss == "triplet" and ft.miner not in ("batch_hard", "semi_hard"):
        raise SimsearchError(f"finetune.miner must be batch_hard or semi_hard, not '{ft.miner}'")
    if ft.unfreeze < 0:
        raise SimsearchError(f"finetune.unfreeze must be 0 or a number of stages, not {ft.unfreeze}")
    if ft.batch_norm not in ("frozen", "train"):
        raise SimsearchError(f"finetune.batch_norm must be frozen or train, not '{ft.batch_norm}'")
    if not 0 < ft.layer_decay <= 1:
        raise SimsearchError(f"finetune.layer_decay must be in (0, 1], not {ft.layer_decay}")
    if ft.crop_scale is not None and not 0 < ft.crop_scale <= 1:
        raise SimsearchError(f"finetune.crop_scale={ft.crop_scale} must be a share of the image's area in (0, 1]: "
                             "e.g. 0.6, or 1 for no crop")
    if not 0 <= ft.warmup_epochs <= ft.epochs:
        raise SimsearchError(f"finetune.warmup_epochs must be between 0 and finetune.epochs={ft.epochs}, not {ft.warmup_epochs}")
    if not 0 < ft.val_fraction < 1:
        raise SimsearchError(f"finetune.val_fraction must be between 0 and 1, not {ft.val_fraction}")
    labelled = [f"val/{name}" for name in metric_names(VALIDATION_K)]  # the metrics table, at K = 10
    if ft.monitor not in ("auto", *LABEL_FREE_MONITORS, *labelled):
        raise SimsearchError(f"finetune.monitor must be one of auto, {', '.join(LABEL_FREE_MONITORS + labelled)}, "
                             f"not '{ft.monitor}'")
    if not LOSSES[ft.loss].needs_labels and ft.monitor in labelled:
        raise SimsearchError(f"finetune.monitor={ft.monitor} reads labels, and finetune.loss={ft.loss} is label-free: "
                             f"select by {' or '.join(LABEL_FREE_MONITORS)} (auto: last)")
    if not 0 <= ft.momentum < 1:
        raise SimsearchError(f"finetune.momentum must be in [0, 1), not {ft.momentum}")
    if LOSSES[ft.loss].needs_labels:
        labels = collection.labels
        classes = len(np.unique(labels[labels >= 0]))
        if classes == 0:
            raise SimsearchError(
                f"finetune.loss={ft.loss} needs labels, and the train split has none: "
                f"use a label-free one ({', '.join(k for k in LOSSES if not LOSSES[k].needs_labels)}), or a labelled collection"
            )
        if ft.batch_size % ft.m_per_class:
            raise SimsearchError(f"finetune.batch_size={ft.batch_size} must be a multiple of finetune.m_per_class={ft.m_per_class}")
        wanted = ft.batch_size // ft.m_per_class
        if wanted > classes:
            raise SimsearchError(
                f"finetune.batch_size={ft.batch_size} with finetune.m_per_class={ft.m_per_class} asks for {wanted} classes "
                f"per batch, but the train split has {classes}: lower the batch size or raise m_per_class"
            )



def load_trained_head(head: ProjectionHead, path: str | Path, spec: Any) -> None:
    """Start from the head of a head-only checkpoint (linear probe, then fine-tune: the backbone's features are
    not pulled about by a random head); refused unless it was trained on the same network (any resolution)
    with the same head sizes."""
    checkpoint = read_checkpoint(Path(path))
    meta = checkpoint["simsearch"]
    network = ("name", "family", "weights")  # another resolution is allowed: the head maps the same network's features
    if any(meta["backbone"][key] != spec.to_dict()[key] for key in network):
        raise SimsearchError(f"finetune.init_head={path} was trained on another backbone "
                             f"({meta['backbone']['name']}, {meta['backbone']['weights']} weights): use a head of this one")
    state = {k.removeprefix("embedder.head."): v for k, v in checkpoint["state_dict"].items()
             if k.startswith("embedder.head.")}
    try:
        head.load_state_dict(state)
    except RuntimeError:
        raise SimsearchError(f"finetune.init_head={path} has a head of sizes {meta['head']}: set finetune.hidden_dim "
                             "and finetune.dim to match it") from None


LABEL_FREE_MONITORS = ["last", "val/rankme"]


def selection(ft: DictConfig) -> str:
    """What picks the kept checkpoint: `finetune.monitor`, where auto is validation MAP@R with a supervised loss and
    the last epoch with a label-free one (its loss is no yardstick across epochs: the views are random and a
    momentum teacher's targets move)."""
    if ft.monitor != "auto":
        return ft.monitor
    return "val/map@r" if LOSSES[ft.loss].needs_labels else "last"


def selection_callbacks(checkpoint_dir: Path, monitor: str, patience: int) -> list[Any]:
    """The checkpoint kept by `monitor`, and early stopping; none for last (`last.ckpt` is copied when training ends)."""
    if monitor == "last":
        return []
    short = monitor.removeprefix("val/").replace("@", "_")
    best = ModelCheckpoint(dirpath=checkpoint_dir, filename=f"best-epoch{{epoch:03d}}-{short}{{{monitor}:.4f}}",
                           auto_insert_metric_name=False, monitor=monitor, mode="max", save_top_k=1)
    return [best, EarlyStopping(monitor=monitor, mode="max", patience=patience)]


def copy_of_last(last: Path, epochs: int) -> Path:
    """The last epoch's checkpoint as the kept one, under a name of its own (a resumed run rewrites last.ckpt):
    written beside, then renamed, so a crash never leaves half a file."""
    kept = last.with_name(f"best-epoch{epochs - 1:03d}.ckpt")
    partial = kept.with_suffix(".ckpt.partial")
    shutil.copyfile(last, partial)
    os.replace(partial, kept)
    return kept


def validation_labels(collection: ImageCollection) -> np.ndarray:
    """A label-free run's labels, for the report only: the collection's where it can tell them, else none (-1)."""
    try:
        return np.asarray(collection.labels, dtype=np.int64)
    except Exception as error:  # a collection that cannot tell its labels trains without them
        log.info("no labels to report validation Precision@10 with (%s): RankMe only", error)
        return np.full(len(collection), -1, dtype=np.int64)


def _compatible(meta: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    keys = ("backbone", "head", "unfreeze", "loss")
    return [f"{k}: {meta.get(k)} != {wanted.get(k)}" for k in keys if meta.get(k) != wanted.get(k)]



def fit(cfg: DictConfig) -> dict[str, Any]:
    """Train a head (and optionally stages) on the train split; keep the checkpoint `finetune.monitor` selects."""
    ft = cfg.finetune
    cfg = OmegaConf.merge(cfg, {"data": {"split": "train"}, "model": {"checkpoint": None}})
    cfg = OmegaConf.merge(cfg, {"model": resolve_model_config(cfg.model)})
    resize = Resize(cfg.model.image_size, cfg.model.interpolation)
    collection = build_collection(cfg.data, resize, cfg.run.seed)  # cheap: no image is decoded
    check_finetune_config(ft, collection)
    needs_labels = LOSSES[ft.loss].needs_labels
    spec = backbone_spec(cfg.model)
    backbone = build_backbone(spec, cfg.run.seed)  # before any extraction: weights and stage groups are checked
    unfrozen_stages(backbone.network, ft.unfreeze)
    if ft.unfreeze == 0:
        features, store = cached_features(cfg)
        labels, classes, collection = store.labels, store.classes, None
    else:
        labels = collection.labels if needs_labels else validation_labels(collection)
        features, classes = None, collection.classes if (labels >= 0).any() else []
    train_rows, val_rows = split_rows(len(labels), ft.val_fraction, cfg.run.seed)
    train_rows = train_rows[labels[train_rows] >= 0] if needs_labels else train_rows
    monitor = selection(ft)
    fewest = 11 if monitor.startswith("val/") and monitor != "val/rankme" else 2
    if len(val_rows) < fewest:
        raise SimsearchError(f"finetune.val_fraction={ft.val_fraction} holds out {len(val_rows)} items; validation "
                             f"by {monitor} needs at least {fewest}: raise it, or use more data")
    metadata = finetune_record(spec, cfg.run.seed, backbone.width, ft.hidden_dim, ft.dim, ft.unfreeze, ft.loss,
                               train_data={"name": cfg.data.name, "split": "train", "rows": len(train_rows),
                                           "validation_rows": len(val_rows)},
                               config=OmegaConf.to_container(cfg, resolve=True))
    checkpoint_dir = Path(ft.checkpoint_dir) / ft.name
    last = checkpoint_dir / "last.ckpt"
    resume_from = last if ft.resume and last.is_file() else None
    if resume_from is not None:
        problems = _compatible(checkpoint_metadata(last), metadata)
        if problems:
            raise SimsearchError(f"{last} was trained differently ({'; '.join(problems)}): "
                                 "use finetune.resume=false or another finetune.name")
        log.info("resuming from %s", last)
    torch.manual_seed(cfg.run.seed)
    head = ProjectionHead(backbone.width, ft.hidden_dim, ft.dim)
    if ft.init_head and resume_from is None:
        load_trained_head(head, ft.init_head, spec)
    embedder = Embedder(Preprocess.from_spec(spec.preprocessing), backbone.network, head)
    if ft.unfreeze and cfg.model.channels_last:  # the memory layout extraction uses (model.channels_last)
        embedder.use_channels_last()
    module = MetricLearningModule(embedder, ft, classes, metadata)
    train_loader, val_loader = loaders(cfg, labels, train_rows, val_rows, features, collection)
    chosen = selection_callbacks(checkpoint_dir, monitor, ft.patience)
    # every epoch, improved or not: an interrupted run resumes where it stopped
    latest = ModelCheckpoint(dirpath=checkpoint_dir, filename="last", monitor=None, save_top_k=1,
                             enable_version_counter=False)
    run = start_run(cfg, "finetune", name=f"finetune-{ft.name}")
    # at most once per epoch: Lightning warns of a logging interval longer than an epoch
    extra: dict[str, Any] = {"max_epochs": ft.epochs, "enable_checkpointing": True,
                             "log_every_n_steps": max(1, min(10, len(train_loader))),
                             "num_sanity_val_steps": 0}
    if run is not None:
        from lightning.pytorch.loggers import WandbLogger

        extra["logger"] = WandbLogger(experiment=run)
    trainer = build_trainer(cfg, [*chosen, latest], **extra)
    trainer.fit(module, train_loader, val_loader, ckpt_path=resume_from, weights_only=True)
    finish(run)
    if not trainer.is_global_zero:
        return {}
    kept = chosen[0].best_model_path if chosen else str(copy_of_last(last, trainer.current_epoch))
    score = chosen[0].best_model_score if chosen else None
    summary = {"best_checkpoint": kept, "monitor": monitor, "best_score": float(score) if score is not None else None,
               "epochs_run": trainer.current_epoch, "last_checkpoint": str(last),
               "train_rows": len(train_rows), "validation_rows": len(val_rows)}
    write_json_atomically(checkpoint_dir / "finetune.json", {**summary, "metadata": metadata})
    score = ("the last epoch" if monitor == "last"
             else f"{monitor} = {summary['best_score']:.4f} on {len(val_rows)} held-out train items")
    print(f"best checkpoint: {summary['best_checkpoint']}  ({score})")
    return summary

