"""Extraction: `Trainer.predict` streams per-rank shards to disk, then one merge writes the store.

Every item has a key (a file's relative path, size, mtime and ctime; a dataset's split and index) and
every vector is stored beside its key: in each shard (safetensors metadata) and in items.jsonl. A
vector is reused only when its key and the run's fingerprint (model, preprocessing, seed, dtype,
data source) match; nothing is matched by position. So:

- a killed run (kill -9, a preempted SLURM job) started again embeds only the items no complete
  shard of the same fingerprint holds, even if the folder changed in between;
- an extraction into the run.dir of a store of the same fingerprint embeds only new or changed
  items, drops removed ones and reuses the rest (incremental), giving the store a fresh run gives.

The new store is written in `run.dir/.staging/` and swapped in with manifest.json last; until then
the previous store stays readable, whatever happens to the run. One run at a time holds run.dir/.lock.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from simsearch.catalogue import Catalogue, join, read_catalogue, unmatched_records, write_metadata
from simsearch.config import save_config
from simsearch.data import ImageCollection, Resize
from simsearch.data.loading import ImageDataModule
from simsearch.data.registry import dataset_kind, refuse_inside_collection
from simsearch.errors import SimsearchError
from simsearch.files import replace_atomically
from simsearch.identity import embedder_identity, run_fingerprint
from simsearch.model.factory import build_embedder, resolve_model_config
from simsearch.model.inference import check_inference_mode, prepare_inference, trainer_precision
from simsearch.model.module import EmbeddingModule
from simsearch.runtime import build_trainer, phase_bar
from simsearch.store import (
    RunLock,
    Store,
    finish_interrupted_swap,
    finish_store,
    fresh_staging,
    swap_in,
)
from simsearch.tracking import finish, log_metrics, start_run

log = logging.getLogger(__name__)
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
COPY_CHUNK = 65_536  # reused rows copied per step: bounded memory for any store size
FREE_MARGIN_BYTES = 1 << 20  # beyond the vectors: labels, items, manifest of a small store


class ShardWriter(BasePredictionWriter):
    """Writes each predicted batch of each rank to `shards/attempt{A}-rank{R}-batch{B}.safetensors`,
    with the items' keys in the metadata beside their vectors."""

    def __init__(self, shard_dir: Path, dtype: torch.dtype, fingerprint: str, attempt: int, keys: list[str]):
        super().__init__(write_interval="batch")
        self.shard_dir = shard_dir
        self.dtype = dtype
        self.fingerprint = fingerprint
        self.attempt = attempt
        self.keys = keys

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.shard_dir.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(
        self, trainer, pl_module, prediction: dict[str, Any], batch_indices, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        indices = prediction["index"].cpu().tolist()
        reasons = {int(i): r for i, r, ok in zip(indices, prediction["reason"], prediction["valid"]) if not ok}
        tensors = {
            "index": prediction["index"].cpu().to(torch.int64).contiguous(),
            "valid": prediction["valid"].cpu().to(torch.uint8).contiguous(),
            "embeddings": prediction["embeddings"].cpu().to(self.dtype).contiguous(),
        }
        metadata = {"reasons": json.dumps(reasons), "fingerprint": self.fingerprint,
                    "keys": json.dumps([self.keys[i] for i in indices])}
        name = f"attempt{self.attempt:03d}-rank{trainer.global_rank:04d}-batch{batch_idx:08d}.safetensors"
        path = self.shard_dir / name
        # a shard is either complete or absent
        replace_atomically(path, lambda temporary: save_file(tensors, str(temporary), metadata=metadata))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier("simsearch-shards-written")


def shard_fingerprint(fingerprint: dict[str, str]) -> str:
    return f"{fingerprint['embedder']}-{fingerprint['source']}"


def complete_shards(shard_dir: Path, fingerprint: str) -> list[Path]:
    """The shards of this fingerprint that open and hold one vector and one key per row; anything else is ignored."""
    shards = []
    for path in sorted(shard_dir.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy") as shard:
                metadata = shard.metadata() or {}
                if metadata.get("fingerprint") != fingerprint:
                    continue
                rows = shard.get_slice("index").get_shape()[0]
                if shard.get_slice("embeddings").get_shape()[0] != rows or shard.get_slice("valid").get_shape()[0] != rows \
                        or len(json.loads(metadata["keys"])) != rows:
                    raise ValueError("tensors of different lengths")
        except Exception as error:  # truncated or corrupt: redo its items
            log.warning("ignoring the incomplete shard %s (%s): its items are embedded again", path.name, error)
            continue
        shards.append(path)
    return shards


def next_attempt(shard_dir: Path) -> int:
    numbers = [int(m.group(1)) for p in shard_dir.glob("attempt*") if (m := re.match(r"attempt(\d+)-", p.name))]
    return max(numbers, default=-1) + 1


def _read_shard_keys(path: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """A shard's keys, validity and reason of each row (by row, not by the index of the run that wrote it)."""
    with safe_open(str(path), framework="numpy") as shard:
        metadata = shard.metadata()
        index = shard.get_tensor("index").tolist()
        reasons = {int(k): v for k, v in json.loads(metadata.get("reasons", "{}")).items()}
        return json.loads(metadata["keys"]), shard.get_tensor("valid").astype(bool), [reasons.get(i, "") for i in index]


@dataclass
class Plan:
    """Where each item of the collection gets its vector: the previous store (by key), a shard of this
    run or of a killed one (by key), or nowhere yet (to embed). Unreadable items of the previous store
    are tried again: a file made readable by `chmod` keeps its key."""

    keys: list[str]
    previous_row: np.ndarray  # (N,) row in the previous store, -1 where none
    shard_of: np.ndarray  # (N,) number of the shard holding the item, -1 where none
    shard_row: np.ndarray  # (N,) row within that shard
    skip_reason: dict[int, str] = field(default_factory=dict)  # unreadable items, by position
    shards: list[Path] = field(default_factory=list)

    @classmethod
    def empty(cls, keys: list[str]) -> Plan:
        count = len(keys)
        return cls(keys, np.full(count, -1, np.int64), np.full(count, -1, np.int64), np.full(count, -1, np.int64))

    def done(self) -> np.ndarray:
        skipped = np.zeros(len(self.keys), dtype=bool)
        skipped[list(self.skip_reason)] = True
        return (self.previous_row >= 0) | (self.shard_of >= 0) | skipped

    def reuse_previous(self, previous: Store) -> None:
        position_of = {key: position for position, key in enumerate(self.keys)}
        for row, item in enumerate(previous.items):
            position = position_of.get(item.get("key"))
            if position is not None:
                self.previous_row[position] = row

    def add_shards(self, shards: list[Path]) -> None:
        position_of = {key: position for position, key in enumerate(self.keys)}
        for path in shards:
            number = len(self.shards)
            self.shards.append(path)
            keys, valid, reasons = _read_shard_keys(path)
            for row, (key, ok, reason) in enumerate(zip(keys, valid.tolist(), reasons)):
                position = position_of.get(key)  # keys of items no longer in the collection are dropped
                if position is None or self.shard_of[position] >= 0 or self.previous_row[position] >= 0:
                    continue  # the sampler's padding duplicates and items done already
                if ok:
                    self.shard_of[position], self.shard_row[position] = number, row
                    self.skip_reason.pop(position, None)
                else:
                    self.skip_reason[position] = reason or "unreadable"


def reusable_store(store_dir: Path, fingerprint: dict[str, str]) -> Store | None:
    """The complete store already in run.dir, if its vectors can be reused by key (same fingerprint)."""
    if not (store_dir / "manifest.json").is_file():
        return None
    try:
        previous = Store.open(store_dir)
    except SimsearchError as error:
        log.warning("the store in %s cannot be reused (%s): every item is embedded again", store_dir, error)
        return None
    if previous.manifest.get("fingerprint") != fingerprint:
        log.info("the store in %s was made with another model or data source: it is replaced", store_dir)
        return None
    return previous


def merge_vectors(plan: Plan, previous: Store | None, dim: int, dtype: str, out_path: Path) -> np.ndarray:
    """Write `out_path` (.npy, rows in collection order, unreadable items left out) from the previous
    store's rows and the shards' rows; returns the positions written. Streams: one shard, or one chunk
    of reused rows, in memory at a time; the output is memory-mapped."""
    kept = np.flatnonzero((plan.previous_row >= 0) | (plan.shard_of >= 0))
    row_of_position = np.full(len(plan.keys), -1, dtype=np.int64)
    row_of_position[kept] = np.arange(len(kept))
    needed = len(kept) * dim * np.dtype(dtype).itemsize
    free = shutil.disk_usage(out_path.parent).free
    if needed + FREE_MARGIN_BYTES > free:
        raise SimsearchError(f"not enough free disk space for the new store in {out_path.parent.parent}: its vectors "
                             f"need {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; the previous store is untouched")
    output = np.lib.format.open_memmap(out_path, mode="w+", dtype=dtype, shape=(len(kept), dim))
    with open(out_path, "r+b") as handle:  # every block allocated now: a disk filled meanwhile is ENOSPC here, not SIGBUS
        os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    reused = np.flatnonzero(plan.previous_row >= 0)
    for start in range(0, len(reused), COPY_CHUNK):
        positions = reused[start : start + COPY_CHUNK]
        output[row_of_position[positions]] = previous.embeddings[plan.previous_row[positions]]
    for number, path in enumerate(phase_bar(plan.shards, "merging", unit="shard")):
        positions = np.flatnonzero(plan.shard_of == number)
        if len(positions):
            with safe_open(str(path), framework="numpy") as shard:
                output[row_of_position[positions]] = shard.get_tensor("embeddings")[plan.shard_row[positions]]
    output.flush()
    del output
    return kept


def describe_store(cfg: DictConfig, collection: ImageCollection, count: int, dim: int, skipped: int) -> dict[str, Any]:
    """What manifest.json records beyond the checksums: enough to rebuild the model and the data."""
    return {
        "count": count,
        "dim": dim,
        "dtype": cfg.store.dtype,
        "skipped": skipped,
        "data": {
            **OmegaConf.to_container(cfg.data, resolve=True),
            "root": str(Path(cfg.data.root).expanduser().resolve()) if cfg.data.root else None,
            "classes": list(collection.classes),
        },
        "model": {**OmegaConf.to_container(cfg.model, resolve=True), "seed": cfg.run.seed},
        "dataset": cfg.data.name,
        "split": cfg.data.split,
        "weights": cfg.model.weights,
        "image_size": cfg.model.image_size,
    }


def write_store(cfg: DictConfig, collection: ImageCollection, staging: Path, plan: Plan, previous: Store | None,
                identity: dict[str, Any], catalogue: Catalogue | None = None) -> dict[str, Any]:
    """Write the complete store into `staging` (manifest last) from the plan's sources; `identity` holds the
    run's fingerprint and the embedder's identity (`simsearch.identity`); `catalogue`: data.metadata, read."""
    dim = previous.dim if previous is not None and (plan.previous_row >= 0).any() else _embedding_dim(plan.shards)
    kept = merge_vectors(plan, previous, dim, cfg.store.dtype, staging / "embeddings.npy") if dim else np.zeros(0, int)
    skipped = [{**collection.item_record(i), "reason": plan.skip_reason.get(i, "unreadable")}
               for i in np.flatnonzero((plan.previous_row < 0) & (plan.shard_of < 0)).tolist()]
    skipped += collection.unlisted
    if len(kept) == 0:
        raise SimsearchError(f"none of the {len(collection)} inputs could be read: "
                             + "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3]))
    if skipped:
        log.warning("%d of %d inputs could not be read and were skipped: listed in %s",
                    len(skipped), len(collection) + len(collection.unlisted), Path(cfg.run.dir) / "skipped.jsonl")
    labels = collection.labels[kept].astype(np.int64)
    classes = collection.classes
    items = [{**collection.item_record(int(i)), "label": classes[y] if 0 <= y < len(classes) else None}
             for i, y in zip(kept, labels.tolist())]
    save_config(cfg, staging / "config.yaml")
    reused = int((plan.previous_row >= 0).sum())
    description = {**describe_store(cfg, collection, len(kept), dim, len(skipped)), **identity,
                   "embedded": len(kept) - reused, "reused": reused}
    if catalogue is not None:
        description["metadata"] = store_metadata(cfg, catalogue, items, staging)
    return finish_store(staging, labels, items, skipped, description)


def store_metadata(cfg: DictConfig, catalogue: Catalogue, items: list[dict[str, Any]], staging: Path) -> dict[str, Any]:
    """metadata.jsonl and metadata_unmatched.jsonl from the catalogue joined by key; one warning for what did not
    match. Metadata is no part of the fingerprint: a changed row rewrites this file, never a vector."""
    joined = join(catalogue, items)
    counts = write_metadata(staging, items, joined.rows, catalogue.columns, unmatched_records(joined))
    if joined.unmatched_rows or joined.items_without_row:
        log.warning("data.metadata: %d catalogue row(s) match no item and %d item(s) have no catalogue row (e.g. %s): "
                    "listed in %s", len(joined.unmatched_rows), len(joined.items_without_row),
                    (joined.unmatched_rows + joined.items_without_row)[0], Path(cfg.run.dir) / "metadata_unmatched.jsonl")
    return {"source": catalogue.source, "key": catalogue.key, "columns": catalogue.columns, **counts}


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


def extract(cfg: DictConfig, augment_seed: int | None = None) -> dict[str, Any]:
    """Embed `cfg.data` with `cfg.model` into a store at `cfg.run.dir`; returns its manifest on every rank.

    `model.checkpoint` (a fine-tuned model) sets the backbone and preprocessing it was trained with; null
    preprocessing keys take the backbone's own (`resolve_model_config`), and the manifest records them resolved.
    `augment_seed` embeds seeded random augmentations instead (the cached views of NT-Xent fine-tuning).
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
            return extract_locked(cfg, store_dir, augment_seed)
    except BaseException:
        if created:  # a run refused (missing data.root, bad weights) leaves no empty run.dir behind
            try:
                store_dir.rmdir()
            except OSError:
                pass  # not empty: shards of a run to resume
        raise


def extract_locked(cfg: DictConfig, store_dir: Path, augment_seed: int | None) -> dict[str, Any]:
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

    return merge_on_rank_zero(trainer, write, lambda manifest: log_extraction(cfg, manifest, augment_seed))


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


def log_extraction(cfg: DictConfig, manifest: dict[str, Any], augment_seed: int | None) -> None:
    """The store's size and what was skipped, under the run's resolved config, to W&B."""
    if augment_seed is not None:
        return  # cached fine-tuning views are an internal step
    run = start_run(cfg, "extract")
    log_metrics(run, {key: manifest[key] for key in ("count", "skipped", "dim", "embedded", "reused")}, prefix="extract/")
    finish(run)
    print(f"store of {manifest['count']} items (dim {manifest['dim']}, {manifest['skipped']} skipped; "
          f"embedded {manifest['embedded']}, reused {manifest['reused']}): {cfg.run.dir}")


def _embedding_dim(shards: list[Path]) -> int:
    """The width of the shards' vectors; 0 when no shard holds any (every input unreadable)."""
    if not shards:
        return 0
    with safe_open(str(shards[0]), framework="numpy") as shard:
        return int(shard.get_slice("embeddings").get_shape()[1])
