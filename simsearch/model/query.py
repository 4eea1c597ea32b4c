"""Embedding new images (queries, uploads) exactly as a store's items were embedded: the model,
preprocessing, precision and inference path its manifest records (`simsearch.identity`)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from simsearch.data.collections import prepared_pixels
from simsearch.identity import stored_identity
from simsearch.model.factory import build_embedder
from simsearch.model.inference import prepare_inference
from simsearch.runtime import resolve_device


def autocast_for(precision: str, device_type: str) -> Any:
    """The autocast Lightning's `precision` runs a forward pass under (none for fp32)."""
    if precision.startswith("bf16"):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device_type, dtype=torch.float16)
    return nullcontext()


class QueryEncoder:
    """Embeds new images exactly as the store was embedded: the model, preprocessing, precision and
    inference path (frozen or eager) in its manifest. Built once per process (the model load is the slow
    part); `encode` then takes any number of images."""

    def __init__(self, manifest: dict[str, Any], device: str = "auto"):
        model_cfg = OmegaConf.create(manifest["model"])
        identity = stored_identity(manifest)
        self.image_size_px = int(model_cfg.image_size)
        self.device = resolve_device(device)
        on_gpu = self.device.startswith("cuda")
        embedder = build_embedder(model_cfg, int(model_cfg.get("seed", 0))).eval()
        channels_last = bool(model_cfg.get("channels_last", True))
        recorded_path = identity.get("inference") or "eager"
        self.precision, self.path = prepare_inference(embedder, "auto" if on_gpu else recorded_path,
                                                      identity.get("precision"), channels_last, on_gpu)
        if channels_last:
            embedder.use_channels_last()
        self.embedder = embedder.to(self.device).requires_grad_(False)

    def encode(self, images: list[Image.Image]) -> np.ndarray:
        """(len(images), D) float32 unit-norm embeddings. Each image, in whatever mode it comes (RGBA, 16-bit
        grey, CMYK, an EXIF-rotated photo), is prepared as the store's items were (`prepared_pixels`)."""
        resize = self.embedder.preprocess.resize
        with torch.inference_mode(), autocast_for(self.precision if self.path == "eager" else "32-true",
                                                   torch.device(self.device).type):
            pixels = torch.stack([prepared_pixels(image, resize) for image in images]).to(self.device)
            return self.embedder(pixels).float().cpu().numpy()
