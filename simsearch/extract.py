"""Extraction: `Trainer.predict` streams per-rank shards to disk, then one merge writes the store.

Each shard is one batch of one rank, written atomically (temp file + rename) as safetensors with the
items' dataset indices beside their vectors, so the merge places every row by index: the distributed
sampler's padding duplicates collapse, and an item missing from every shard is an error, not a hole.

A killed run (kill -9, a preempted SLURM job) started again with the same command and run.dir embeds
only the items that no complete shard of the same run holds: each shard carries a fingerprint of the
data and model config, and a half-written shard (a .tmp file, or one that does not open) is ignored
and its items redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from simsearch.config import save_config
from simsearch.data import ImageCollection, ImageDataModule
from simsearch.errors import SimsearchError
from simsearch.model import EmbeddingModule, build_embedder, resolve_model_config
from simsearch.runtime import build_trainer
from simsearch.store import finish_store, write_jsonl

log = logging.getLogger(__name__)
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class ShardWriter(BasePredictionWriter):
    """Writes each predicted batch of each rank to `shards/attempt{A}-rank{R}-batch{B}.safetensors`."""

    def __init__(self, shard_dir: Path, dtype: torch.dtype, fingerprint: str, attempt: int):
        super().__init__(write_interval="batch")
        self.shard_dir = shard_dir
        self.dtype = dtype
        self.fingerprint = fingerprint
        self.attempt = attempt

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.shard_dir.mkdir(parents=True, exist_ok=True)

    def write_on_batch_end(
        self, trainer, pl_module, prediction: dict[str, Any], batch_indices, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        reasons = {
            int(i): r for i, r, ok in zip(prediction["index"], prediction["reason"], prediction["valid"]) if not ok
        }
        tensors = {
            "index": prediction["index"].cpu().to(torch.int64).contiguous(),
            "valid": prediction["valid"].cpu().to(torch.uint8).contiguous(),
            "embeddings": prediction["embeddings"].cpu().to(self.dtype).contiguous(),
        }
        name = f"attempt{self.attempt:03d}-rank{trainer.global_rank:04d}-batch{batch_idx:08d}.safetensors"
        path = self.shard_dir / name
        temporary = path.with_suffix(".tmp")
        save_file(tensors, str(temporary), metadata={"reasons": json.dumps(reasons), "fingerprint": self.fingerprint})
        os.replace(temporary, path)  # a shard is either complete or absent

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier("simsearch-shards-written")


def run_fingerprint(cfg: DictConfig, count: int, augment_seed: int | None) -> str:
    """What makes two runs' shards interchangeable: the data, the model, the seed, the dtype."""
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in ("batch_size", "num_workers")}
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in ("channels_last", "compile")}
    payload = {"data": data, "model": model, "seed": cfg.run.seed, "dtype": cfg.store.dtype, "count": count,
               "augment_seed": augment_seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def complete_shards(shard_dir: Path, fingerprint: str) -> list[Path]:
    """The shards of this run that open and hold one vector per index; anything else is ignored."""
    shards = []
    for path in sorted(shard_dir.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="numpy") as shard:
                if (shard.metadata() or {}).get("fingerprint") != fingerprint:
                    continue
                rows = shard.get_slice("index").get_shape()[0]
                if shard.get_slice("embeddings").get_shape()[0] != rows or shard.get_slice("valid").get_shape()[0] != rows:
                    raise ValueError("tensors of different lengths")
        except Exception as error:  # truncated or corrupt: redo its items
            log.warning("ignoring the incomplete shard %s (%s): its items are embedded again", path.name, error)
            continue
        shards.append(path)
    return shards


def next_attempt(shard_dir: Path) -> int:
    numbers = [int(m.group(1)) for p in shard_dir.glob("attempt*") if (m := re.match(r"attempt(\d+)-", p.name))]
    return max(numbers, default=-1) + 1


def _read_shard_keys(path: Path) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    with safe_open(str(path), framework="numpy") as shard:
        reasons = {int(k): v for k, v in json.loads(shard.metadata().get("reasons", "{}")).items()}
        return shard.get_tensor("index"), shard.get_tensor("valid").astype(bool), reasons


def merge_shards(shards: list[Path], count: int, dim: int, dtype: str, out_path: Path) -> tuple[np.ndarray, dict[int, str]]:
    """Write `out_path` (.npy, rows in dataset order, unreadable items left out) from the shards.

    Returns the indices of the rows written and the reason for each skipped index. Streams: one
    shard in memory at a time, the output memory-mapped. Fails if any item is in no shard.
    """
    owner = np.full(count, -1, dtype=np.int64)  # which shard holds each index first
    valid = np.zeros(count, dtype=bool)
    reasons: dict[int, str] = {}
    for number, path in enumerate(shards):
        indices, ok, shard_reasons = _read_shard_keys(path)
        first = owner[indices] < 0  # padding duplicates of the distributed sampler are dropped
        owner[indices[first]] = number
        valid[indices[first]] = ok[first]
        reasons.update(shard_reasons)
    missing = np.flatnonzero(owner < 0)
    if len(missing):
        raise RuntimeError(f"{len(missing)} of {count} items are in no shard (first: {missing[:5].tolist()})")
    kept = np.flatnonzero(valid)
    if len(kept) == 0:
        return kept, {i: reasons.get(i, "unreadable") for i in range(count)}
    row_of_index = np.cumsum(valid) - 1
    temporary = out_path.with_suffix(".tmp.npy")
    output = np.lib.format.open_memmap(temporary, mode="w+", dtype=dtype, shape=(len(kept), dim))
    for number, path in enumerate(shards):
        with safe_open(str(path), framework="numpy") as shard:
            indices = shard.get_tensor("index")
            take = (owner[indices] == number) & valid[indices]
            output[row_of_index[indices[take]]] = shard.get_tensor("embeddings")[take]
    output.flush()
    del output
    os.replace(temporary, out_path)
    return kept, {i: reasons.get(i, "unreadable") for i in np.flatnonzero(~valid).tolist()}


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


def write_store(cfg: DictConfig, collection: ImageCollection, store_dir: Path, shards: list[Path]) -> dict[str, Any]:
    """Merge the shards into a complete store at `store_dir` and write its manifest."""
    dim = _embedding_dim(shards)
    kept, reasons = merge_shards(shards, len(collection), dim, cfg.store.dtype, store_dir / "embeddings.npy")
    skipped = [{**collection.item_record(i), "reason": reason} for i, reason in sorted(reasons.items())]
    if len(kept) == 0:
        write_jsonl(store_dir / "skipped.jsonl", skipped)
        raise SimsearchError(f"none of the {len(collection)} inputs could be read: see {store_dir / 'skipped.jsonl'}")
    if skipped:
        log.warning("%d of %d inputs could not be read and were skipped: listed in %s",
                    len(skipped), len(collection), store_dir / "skipped.jsonl")
    labels = collection.labels[kept].astype(np.int64)
    classes = collection.classes
    items = [{**collection.item_record(int(i)), "label": classes[y] if 0 <= y < len(classes) else None}
             for i, y in zip(kept, labels.tolist())]
    save_config(cfg, store_dir / "config.yaml")
    description = describe_store(cfg, collection, len(kept), dim, len(skipped))
    manifest = finish_store(store_dir, labels, items, skipped, description)
    shutil.rmtree(store_dir / "shards", ignore_errors=True)
    return manifest


def extract(cfg: DictConfig, augment_seed: int | None = None) -> dict[str, Any]:
    """Embed `cfg.data` with `cfg.model` into a store at `cfg.run.dir`; returns its manifest on every rank.

    `model.checkpoint` (a fine-tuned model) sets the backbone and preprocessing it was trained with; null
    preprocessing keys take the backbone's own (`resolve_model_config`), and the manifest records them resolved.
    `augment_seed` embeds seeded random augmentations instead (the cached views of NT-Xent fine-tuning).
    """
    cfg = OmegaConf.merge(cfg, {"model": resolve_model_config(cfg.model)})
    if cfg.store.dtype not in STORE_DTYPES:
        raise SimsearchError(f"store.dtype must be float32 or float16, not '{cfg.store.dtype}'")
    store_dir = Path(cfg.run.dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    (store_dir / "manifest.json").unlink(missing_ok=True)  # until the new store is complete
    on_gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    datamodule = ImageDataModule(cfg.data, cfg.model.image_size, cfg.run.seed, pin_memory=on_gpu,
                                 decode_on_device_by_default=on_gpu)
    problems: list[str] = []  # data and weights are both checked, before any worker starts

    def attempt(load):
        try:
            return load()
        except SimsearchError as error:
            problems.append(str(error))

    attempt(datamodule.setup)
    embedder = attempt(lambda: build_embedder(cfg.model, cfg.run.seed))
    if problems:
        raise SimsearchError("; and ".join(problems))
    collection = datamodule.collection
    fingerprint = run_fingerprint(cfg, len(collection), augment_seed)
    shard_dir = store_dir / "shards"
    done = np.zeros(len(collection), dtype=bool)
    for path in complete_shards(shard_dir, fingerprint):
        done[_read_shard_keys(path)[0]] = True
    if done.any():
        log.info("resuming: %d of %d items are already embedded in %s", done.sum(), len(done), shard_dir)
    module = EmbeddingModule(embedder, cfg.model.channels_last, cfg.model.compile, augment_seed)
    writer = ShardWriter(shard_dir, STORE_DTYPES[cfg.store.dtype], fingerprint, next_attempt(shard_dir))
    trainer = build_trainer(cfg, [writer])
    if done.all():
        log.info("every item is already embedded: merging the shards in %s", shard_dir)
    datamodule.indices = items_to_embed(done, trainer.world_size)
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    return merge_on_rank_zero(trainer, lambda: write_store(cfg, collection, store_dir, complete_shards(shard_dir, fingerprint)),
                              lambda manifest: log_extraction(cfg, manifest, augment_seed))


def items_to_embed(done: np.ndarray, world_size: int) -> np.ndarray | None:
    """The items not in a complete shard (None: all of them), at least one per rank.

    Every rank runs the Trainer even when every item is already embedded: its process group gives the
    ranks a barrier, so only global rank 0 merges. A rank with no item would fail in Lightning's sampler,
    so already-embedded items fill up to one per rank; the merge drops them as duplicates.
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
    outcome = trainer.strategy.broadcast(outcome, src=0)
    if "error" in outcome:
        raise SimsearchError(outcome["error"])
    if trainer.is_global_zero:
        after(outcome["manifest"])
    return outcome["manifest"]


def log_extraction(cfg: DictConfig, manifest: dict[str, Any], augment_seed: int | None) -> None:
    """The store's size and what was skipped, under the run's resolved config, to W&B."""
    from simsearch.tracking import finish, log_metrics, start_run

    if augment_seed is not None:
        return  # cached fine-tuning views are an internal step
    run = start_run(cfg, "extract")
    log_metrics(run, {"count": manifest["count"], "skipped": manifest["skipped"], "dim": manifest["dim"]}, prefix="extract/")
    finish(run)
    print(f"store of {manifest['count']} items (dim {manifest['dim']}, {manifest['skipped']} skipped): {cfg.run.dir}")


def _embedding_dim(shards: list[Path]) -> int:
    if not shards:
        raise RuntimeError("no shard was written")
    with safe_open(str(shards[0]), framework="numpy") as shard:
        return int(shard.get_slice("embeddings").get_shape()[1])
