"""One fine-tuning run: the checks made before any training, the model and its data, `Trainer.fit` with model
selection on the held-out part of the train split, and the summary (`finetune.json`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from simsearch.data import Resize, build_collection
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


def check_finetune_config(ft: DictConfig, labels: np.ndarray) -> None:
    """Every mistake that would otherwise surface mid-run, as one sentence, before any extraction."""
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
    monitors = [f"val/{name}" for name in metric_names(VALIDATION_K)]  # the metrics table, at K = 10
    if ft.monitor not in monitors:
        raise SimsearchError(f"finetune.monitor must be one of {', '.join(monitors)}, not '{ft.monitor}'")
    if LOSSES[ft.loss].needs_labels:
        classes = len(np.unique(labels[labels >= 0]))
        if classes == 0:
            raise SimsearchError(
                f"finetune.loss={ft.loss} needs labels, and the train split has none: "
                "use finetune.loss=ntxent (no labels), or a labelled collection"
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


def _compatible(meta: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    keys = ("backbone", "head", "unfreeze", "loss")
    return [f"{k}: {meta.get(k)} != {wanted.get(k)}" for k in keys if meta.get(k) != wanted.get(k)]



def fit(cfg: DictConfig) -> dict[str, Any]:
    """Train a head (and optionally stages) on the train split; keep the best checkpoint by validation."""
    ft = cfg.finetune
    cfg = OmegaConf.merge(cfg, {"data": {"split": "train"}, "model": {"checkpoint": None}})
    cfg = OmegaConf.merge(cfg, {"model": resolve_model_config(cfg.model)})
    resize = Resize(cfg.model.image_size, cfg.model.interpolation)
    collection = build_collection(cfg.data, resize, cfg.run.seed)  # cheap: no image is decoded
    check_finetune_config(ft, collection.labels)
    spec = backbone_spec(cfg.model)
    backbone = build_backbone(spec, cfg.run.seed)  # before any extraction: weights and stage groups are checked
    unfrozen_stages(backbone.network, ft.unfreeze)
    if ft.unfreeze == 0:
        features, store = cached_features(cfg)
        labels, classes, collection = store.labels, store.classes, None
    else:
        features, labels, classes = None, collection.labels, collection.classes
    train_rows, val_rows = split_rows(len(labels), ft.val_fraction, cfg.run.seed)
    train_rows = train_rows[labels[train_rows] >= 0] if LOSSES[ft.loss].needs_labels else train_rows
    if len(val_rows) < 11:
        raise SimsearchError(f"finetune.val_fraction={ft.val_fraction} holds out {len(val_rows)} items; validation "
                             "Precision@10 needs at least 11: raise it, or use more data")
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
    best = ModelCheckpoint(dirpath=checkpoint_dir, filename="best-epoch{epoch:03d}-map_r{val/map@r:.4f}",
                           auto_insert_metric_name=False, monitor=ft.monitor, mode="max", save_top_k=1)
    # every epoch, improved or not: an interrupted run resumes where it stopped
    latest = ModelCheckpoint(dirpath=checkpoint_dir, filename="last", monitor=None, save_top_k=1,
                             enable_version_counter=False)
    stop = EarlyStopping(monitor=ft.monitor, mode="max", patience=ft.patience)
    run = start_run(cfg, "finetune", name=f"finetune-{ft.name}")
    # at most once per epoch: Lightning warns of a logging interval longer than an epoch
    extra: dict[str, Any] = {"max_epochs": ft.epochs, "enable_checkpointing": True,
                             "log_every_n_steps": max(1, min(10, len(train_loader))),
                             "num_sanity_val_steps": 0}
    if run is not None:
        from lightning.pytorch.loggers import WandbLogger

        extra["logger"] = WandbLogger(experiment=run)
    trainer = build_trainer(cfg, [best, latest, stop], **extra)
    trainer.fit(module, train_loader, val_loader, ckpt_path=resume_from, weights_only=True)
    finish(run)
    if not trainer.is_global_zero:
        return {}
    summary = {"best_checkpoint": best.best_model_path, "monitor": ft.monitor,
               "best_score": float(best.best_model_score) if best.best_model_score is not None else None,
               "epochs_run": trainer.current_epoch, "last_checkpoint": str(last),
               "train_rows": len(train_rows), "validation_rows": len(val_rows)}
    write_json_atomically(checkpoint_dir / "finetune.json", {**summary, "metadata": metadata})
    print(f"best checkpoint: {summary['best_checkpoint']}  ({ft.monitor} = {summary['best_score']:.4f} on "
          f"{len(val_rows)} held-out train items)")
    return summary

