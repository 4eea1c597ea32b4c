"""Per-rank shards of an extraction: `Trainer.predict` streams each batch's vectors to a safetensors file,
every vector beside its item's key, so a killed run resumes from its complete shards (never by position)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors import safe_open
from safetensors.torch import save_file

from simsearch.files import replace_atomically

log = logging.getLogger(__name__)
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


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


def read_shard_keys(path: Path) -> tuple[list[str], np.ndarray, list[str]]:
    """A shard's keys, validity and reason of each row (by row, not by the index of the run that wrote it)."""
    with safe_open(str(path), framework="numpy") as shard:
        metadata = shard.metadata()
        index = shard.get_tensor("index").tolist()
        reasons = {int(k): v for k, v in json.loads(metadata.get("reasons", "{}")).items()}
        return json.loads(metadata["keys"]), shard.get_tensor("valid").astype(bool), [reasons.get(i, "") for i in index]


def embedding_dim(shards: list[Path]) -> int:
    """The width of the shards' vectors; 0 when no shard holds any (every input unreadable)."""
    if not shards:
        return 0
    with safe_open(str(shards[0]), framework="numpy") as shard:
        return int(shard.get_slice("embeddings").get_shape()[1])
