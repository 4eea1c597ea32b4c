"""Extraction: `Trainer.predict` streams per-rank shards to disk, then one merge writes the store.

Each shard is one batch of one rank, written atomically (temp file + rename) as safetensors with the
items' dataset indices beside their vectors, so the merge places every row by index: the distributed
sampler's padding duplicates collapse, and an item missing from every shard is an error, not a hole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
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
from simsearch.model import EmbeddingModule, build_embedder
from simsearch.store import finish_store, write_jsonl

log = logging.getLogger(__name__)
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class ShardWriter(BasePredictionWriter):
    """Writes each predicted batch of each rank to `shards/rank{R}-batch{B}.safetensors`."""

    def __init__(self, shard_dir: Path, dtype: torch.dtype):
        super().__init__(write_interval="batch")
        self.shard_dir = shard_dir
        self.dtype = dtype

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:  # shards of an earlier run in the same run.dir must not be merged
            shutil.rmtree(self.shard_dir, ignore_errors=True)
            self.shard_dir.mkdir(parents=True)
        trainer.strategy.barrier("simsearch-shards-ready")

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
        path = self.shard_dir / f"rank{trainer.global_rank:04d}-batch{batch_idx:08d}.safetensors"
        temporary = path.with_suffix(".tmp")
        save_file(tensors, str(temporary), metadata={"reasons": json.dumps(reasons)})
        os.replace(temporary, path)  # a shard is either complete or absent

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier("simsearch-shards-written")


def _read_shard_keys(path: Path) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    with safe_open(str(path), framework="numpy") as shard:
        reasons = {int(k): v for k, v in json.loads(shard.metadata().get("reasons", "{}")).items()}
        return shard.get_tensor("index"), shard.get_tensor("valid").astype(bool), reasons


def merge_shards(shard_dir: Path, count: int, dim: int, dtype: str, out_path: Path) -> tuple[np.ndarray, dict[int, str]]:
    """Write `out_path` (.npy, rows in dataset order, unreadable items left out) from the shards.

    Returns the indices of the rows written and the reason for each skipped index. Streams: one
    shard in memory at a time, the output memory-mapped.
    """
    shards = sorted(shard_dir.glob("*.safetensors"))
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
    output = np.lib.format.open_memmap(out_path.with_suffix(".tmp.npy"), mode="w+", dtype=dtype, shape=(len(kept), dim))
    for number, path in enumerate(shards):
        with safe_open(str(path), framework="numpy") as shard:
            indices = shard.get_tensor("index")
            take = (owner[indices] == number) & valid[indices]
            output[row_of_index[indices[take]]] = shard.get_tensor("embeddings")[take]
    output.flush()
    del output
    os.replace(out_path.with_suffix(".tmp.npy"), out_path)
    return kept, {i: reasons.get(i, "unreadable") for i in np.flatnonzero(~valid).tolist()}


def resolve_precision(trainer_cfg: DictConfig) -> str:
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


def write_store(cfg: DictConfig, collection: ImageCollection, store_dir: Path, dim: int) -> dict[str, Any]:
    """Merge the shards of `store_dir/shards` into a complete store and write its manifest."""
    kept, reasons = merge_shards(store_dir / "shards", len(collection), dim, cfg.store.dtype, store_dir / "embeddings.npy")
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


def extract(cfg: DictConfig, augment_seed: int | None = None) -> dict[str, Any] | None:
    """Embed `cfg.data` with `cfg.model` into a store at `cfg.run.dir`; returns the manifest on rank 0.

    `model.checkpoint` (a fine-tuned model) sets the image size and normalisation it was trained with.
    `augment_seed` embeds seeded random augmentations instead (the cached views of NT-Xent fine-tuning).
    """
    from simsearch.finetune import model_with_checkpoint

    cfg = OmegaConf.merge(cfg, {"model": model_with_checkpoint(cfg.model)})
    if cfg.store.dtype not in STORE_DTYPES:
        raise SimsearchError(f"store.dtype must be float32 or float16, not '{cfg.store.dtype}'")
    store_dir = Path(cfg.run.dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    (store_dir / "manifest.json").unlink(missing_ok=True)  # until the new store is complete
    datamodule = ImageDataModule(cfg.data, cfg.model.image_size, cfg.run.seed, pin_memory=torch.cuda.is_available())
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
    module = EmbeddingModule(embedder, cfg.model.channels_last, cfg.model.compile, augment_seed)
    writer = ShardWriter(store_dir / "shards", STORE_DTYPES[cfg.store.dtype])
    trainer = build_trainer(cfg, [writer])
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    if not trainer.is_global_zero:
        return None
    dim = _embedding_dim(store_dir / "shards")
    return write_store(cfg, datamodule.collection, store_dir, dim)


def _embedding_dim(shard_dir: Path) -> int:
    first = next(iter(sorted(shard_dir.glob("*.safetensors"))), None)
    if first is None:
        raise RuntimeError(f"no shard was written in {shard_dir}")
    with safe_open(str(first), framework="numpy") as shard:
        return int(shard.get_slice("embeddings").get_shape()[1])
