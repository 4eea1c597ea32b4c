"""The LightningModule that runs an `Embedder` in `Trainer.predict` (its own module: Lightning is imported
only by the commands that run a Trainer, never by `search` or `serve`)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from simsearch.data.loading import augment, decode_jpegs_on
from simsearch.model.embedder import Embedder


class EmbeddingModule(L.LightningModule):
    """Frozen, eval-mode embedder whose `predict_step` returns a batch's embeddings with its indices."""

    def __init__(self, embedder: Embedder, channels_last: bool = True, compile: bool = False,
                 augment_seed: int | None = None):
        super().__init__()
        self.embedder = embedder.eval().requires_grad_(False)
        self.channels_last = channels_last
        self.compile_network = compile
        self.augment_seed = augment_seed  # set: embed a seeded random augmentation (cached NT-Xent views)

    def on_predict_start(self) -> None:
        self.embedder.eval()
        if self.channels_last:
            self.embedder.use_channels_last()
        if self.device.type == "cuda" and self.compile_network:
            self.embedder.backbone = torch.compile(self.embedder.backbone)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Encoded JPEG bytes stay on the host: the device decoder reads them from there."""
        encoded = batch.pop("encoded", None) if isinstance(batch, dict) else None
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        if encoded is not None:
            batch["encoded"] = encoded
        return batch

    @torch.inference_mode()
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        if "encoded" in batch:
            decode_jpegs_on(self.device, batch, self.embedder.preprocess.resize)
        pixels = batch["pixels"]
        if self.augment_seed is not None:
            torch.manual_seed(self.augment_seed * 1_000_003 + batch_idx)
            pixels = augment(pixels, strong=True)
        embeddings = self.embedder(pixels)
        valid, reason = blank_rows(embeddings, batch["valid"], batch["reason"])
        return {"index": batch["index"], "valid": valid, "reason": reason, "embeddings": embeddings}


BLANK_REASON = ("its embedding is zero or not finite (a blank image: all white, all black or fully transparent, "
                "for this model): a store holds unit vectors only")


def blank_rows(embeddings: torch.Tensor, valid: torch.Tensor, reason: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Rows whose vector is not a unit vector (zero: F.normalize of a zero feature; NaN or inf) are marked
    unreadable with the reason, so no store ever holds one."""
    unit = torch.isfinite(embeddings).all(dim=1) & (embeddings.float().norm(dim=1) > 0.5)
    blank = valid.bool() & ~unit.to(valid.device)
    if not blank.any():
        return valid, reason
    flags = blank.tolist()
    return valid.bool() & ~blank, [BLANK_REASON if flag else text for flag, text in zip(flags, reason)]
