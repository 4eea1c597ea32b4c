"""Running an extraction: the run owns run.dir (`RunLock`), plans by key what is already embedded,
embeds the rest with `Trainer.predict` on any devices, and global rank 0 writes the next store beside the
old one and swaps it in."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from simsearch.catalogue import read_catalogue
from simsearch.data import Resize
from simsearch.data.loading import ImageDataModule
from simsearch.data.registry import dataset_kind, refuse_inside_collection
from simsearch.errors import SimsearchError
from simsearch.extraction.assembly import Plan, reusable_store, write_store
from simsearch.extraction.shards import STORE_DTYPES, ShardWriter, complete_shards, next_attempt, shard_fingerprint
from simsearch.identity import embedder_identity, run_fingerprint
from simsearch.model.factory import build_embedder, resolve_model_config
from simsearch.model.inference import check_inference_mode, prepare_inference, trainer_precision
from simsearch.model.module import EmbeddingModule
from simsearch.runtime import build_trainer
from simsearch.store import RunLock, finish_interrupted_swap, fresh_staging, swap_in

log = logging.getLogger(__name__)


def is_secondary_rank() -> bool:
    """A process that a launcher (Lightning's DDP, torchrun, srun) started as a rank other than 0:
    rank 0 holds the lock and writes the store for all."""
    return any(os.environ.get(name, "0") not in ("", "0") for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def prepare_run_dir(store_dir: Path) -> None:
    """run.dir must be a folder simsearch can write (made if missing)."""
    if store_dir.exists() and not store_dir.is_dir():
        raise SimsearchError(f"run.dir={store_dir} is a file, not a folder")
    try:
        store_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SimsearchError(f"cannot create run.dir={store_dir}: {error.strerror or error}") from None
    if not os.access(store_dir, os.W_OK | os.X_OK):
        raise SimsearchError(f"run.dir={store_dir} is not writable")


def check_outside_collection(cfg: DictConfig, store_dir: Path) -> None:
    """A folder collection must not hold run.dir (its pictures would become items of the next extraction),
    unless run.dir is hidden there (a name starting with `.`: never listed)."""
    refuse_inside_collection(cfg.data, "run.dir", store_dir, cfg.run.dir)


def extract_store(cfg: DictConfig, augment_seed: int | None = None,
                  after: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Embed `cfg.data` with `cfg.model` into a store at `cfg.run.dir`; returns its manifest on every rank.

    `model.checkpoint` (a fine-tuned model) sets the backbone and preprocessing it was trained with; null
    preprocessing keys take the backbone's own (`resolve_model_config`), and the manifest records them resolved.
    `augment_seed` embeds seeded random augmentations instead (the cached views of fine-tuning).
    `after(manifest)`: run on global rank 0 once the store is in place (the command's report and log).
    """
    cfg = OmegaConf.merge(cfg, {"model": resolve_model_config(cfg.model)})
    if cfg.store.dtype not in STORE_DTYPES:
        raise SimsearchError(f"store.dtype must be float32 or float16, not '{cfg.store.dtype}'")
    check_inference_mode(cfg.model.inference)
    store_dir = Path(cfg.run.dir)
    check_outside_collection(cfg, store_dir)
    created = not store_dir.exists()
    prepare_run_dir(store_dir)
    try:
        with nullcontext() if is_secondary_rank() else RunLock(store_dir):
            return extract_locked(cfg, store_dir, augment_seed, after or (lambda manifest: None))
    except BaseException:
        if created:  # a run refused (missing data.root, bad weights) leaves no empty run.dir behind
            try:
                store_dir.rmdir()
            except OSError:
                pass  # not empty: shards of a run to resume
        raise


def extract_locked(cfg: DictConfig, store_dir: Path, augment_seed: int | None,
                   after: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """`extract` once the run owns run.dir: plan, embed what is missing, write beside, swap in."""
    if not is_secondary_rank():
        finish_interrupted_swap(store_dir)
    on_gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    datamodule = ImageDataModule(cfg.data, Resize(cfg.model.image_size, cfg.model.interpolation), cfg.run.seed, pin_memory=on_gpu,
                                 decode_on_device_by_default=on_gpu)
    problems: list[str] = []  # data and weights are both checked, before any worker starts

    def attempt(load):
        try:
            return load()
        except SimsearchError as error:
            problems.append(str(error))

    attempt(datamodule.setup)
    catalogue = attempt(lambda: read_catalogue(cfg.data.metadata, cfg.data.metadata_key)) if cfg.data.metadata else None
    embedder = attempt(lambda: build_embedder(cfg.model, cfg.run.seed))
    if problems:
        raise SimsearchError("; and ".join(problems))
    collection = datamodule.collection
    precision, path = prepare_inference(embedder, cfg.model.inference, cfg.trainer.precision, cfg.model.channels_last, on_gpu)
    identity = embedder_identity(cfg.model, cfg.run.seed, precision, path)
    fingerprint = run_fingerprint(cfg, identity, augment_seed, dataset_kind(cfg.data.name))
    plan = Plan.empty([collection.item_record(i)["key"] for i in range(len(collection))])
    # augmented views are seeded by batch: only an unchanged, complete run's views are reused
    previous = reusable_store(store_dir, fingerprint) if augment_seed is None else None
    if previous is not None:
        plan.reuse_previous(previous)
    shard_dir = store_dir / "shards"
    plan.add_shards(complete_shards(shard_dir, shard_fingerprint(fingerprint)))
    done = plan.done()
    if (plan.shard_of >= 0).any():
        log.info("resuming: %d of %d items are already embedded in %s", (plan.shard_of >= 0).sum(), len(done), shard_dir)
    module = EmbeddingModule(embedder, cfg.model.channels_last, cfg.model.compile, augment_seed)
    writer = ShardWriter(shard_dir, STORE_DTYPES[cfg.store.dtype], shard_fingerprint(fingerprint),
                         next_attempt(shard_dir), plan.keys)
    trainer = build_trainer(OmegaConf.merge(cfg, {"trainer": {"precision": trainer_precision(precision, path)}}), [writer])
    if done.all():
        log.info("every item is already embedded (reused or in shards): writing the store")
    if not (done.all() and trainer.world_size == 1):  # several ranks always meet in predict: see items_to_embed
        datamodule.indices = items_to_embed(done, trainer.world_size)
        trainer.predict(module, dataloaders=datamodule.predict_dataloader(), return_predictions=False)

    def write() -> dict[str, Any]:
        nonlocal previous
        known = set(plan.shards)
        plan.add_shards([p for p in complete_shards(shard_dir, shard_fingerprint(fingerprint)) if p not in known])
        staging = fresh_staging(store_dir)
        try:
            manifest = write_store(cfg, collection, staging, plan, previous, {"fingerprint": fingerprint, "embedder": identity},
                                   catalogue)
        except BaseException:  # a full disk, a bad value: the half-written next store goes, the previous one stays
            shutil.rmtree(staging, ignore_errors=True)
            raise
        previous = None  # its memory map, before its files are replaced
        swap_in(staging, store_dir)
        shutil.rmtree(shard_dir, ignore_errors=True)
        return manifest

    return merge_on_rank_zero(trainer, write, after)


def items_to_embed(done: np.ndarray, world_size: int) -> np.ndarray | None:
    """The items still to embed (None: all of them), at least one per rank.

    Every rank runs the Trainer even when every item is already embedded: its process group gives the
    ranks a barrier, so only global rank 0 writes the store. A rank with no item would fail in Lightning's
    sampler, so items already done fill up to one per rank; the plan ignores their new vectors.
    """
    if not done.any():
        return None
    pending = np.flatnonzero(~done)
    if len(pending) >= world_size:
        return pending
    filler = np.flatnonzero(done)[: world_size - len(pending)]
    return np.sort(np.concatenate([pending, filler]))


def merge_on_rank_zero(trainer: L.Trainer, write: Callable[[], dict[str, Any]],
                       after: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Global rank 0 writes the store; every rank gets its manifest (or the same error) by broadcast."""
    outcome: dict[str, Any] = {}
    if trainer.is_global_zero:
        try:
            outcome["manifest"] = write()
        except SimsearchError as error:
            outcome["error"] = str(error)
        except OSError as error:  # a full disk: the same sentence on every rank
            outcome["error"] = f"cannot write the store: {error.strerror or error}" + \
                (f": {error.filename}" if error.filename else "")
    outcome = trainer.strategy.broadcast(outcome, src=0)
    if "error" in outcome:
        raise SimsearchError(outcome["error"])
    if trainer.is_global_zero:
        after(outcome["manifest"])
    return outcome["manifest"]


