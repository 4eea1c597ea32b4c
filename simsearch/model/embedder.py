"""The embedding network: batched preprocessing -> backbone (classifier removed) [-> head] -> L2 norm."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from simsearch.errors import SimsearchError
from simsearch.model.backbones import (
    FAMILIES,
    Backbone,
    BackboneSpec,
    Preprocessing,
    build_network,
    check_name,
    default_preprocessing,
    remove_classifier,
)
from simsearch.model.weights import load_weights

log = logging.getLogger(__name__)
INTERPOLATIONS = ("bilinear", "bicubic")


class Preprocess(nn.Module):
    """uint8 (B, 3, H, W) -> float (B, 3, S, S): resize (antialiased) and normalise, batched.

    Runs on whatever device the module is on, so a GPU never waits for per-image CPU transforms. The
    whole image is resized to S x S (no centre crop: retrieval must see all of an item).
    """

    def __init__(self, image_size_px: int, mean: list[float], std: list[float], interpolation: str = "bilinear"):
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise SimsearchError(f"model.interpolation must be {' or '.join(INTERPOLATIONS)}, not '{interpolation}'")
        self.image_size_px = image_size_px
        self.interpolation = interpolation
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    @classmethod
    def from_spec(cls, preprocessing: Preprocessing) -> Preprocess:
        return cls(preprocessing.image_size, list(preprocessing.mean), list(preprocessing.std), preprocessing.interpolation)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.float()
        if images.shape[-2:] != (self.image_size_px, self.image_size_px):
            size = (self.image_size_px, self.image_size_px)
            images = F.interpolate(images, size=size, mode=self.interpolation, antialias=True, align_corners=False)
        return (images - self.mean) / self.std


class ProjectionHead(nn.Module):
    """MLP on the normalised backbone features: Linear-BN-ReLU-Linear to `dim` (SimCLR's head)."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, dim: int = 128):
        super().__init__()
        self.in_dim, self.hidden_dim, self.dim = in_dim, hidden_dim, dim
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(F.normalize(features.float(), dim=1))


class Embedder(nn.Module):
    """Pixels in, unit-norm float32 embeddings out: preprocess -> backbone [-> head] -> L2 norm."""

    def __init__(self, preprocess: Preprocess, backbone: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.preprocess = preprocess
        self.backbone = backbone
        self.head = head
        self.channels_last = False

    def use_channels_last(self) -> Embedder:
        """NHWC convolutions: faster on GPUs and with oneDNN on CPUs (1.3x for fp32 ResNet-50 on 2 cores)."""
        self.channels_last = True
        self.backbone.to(memory_format=torch.channels_last)
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = self.preprocess(pixels)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.embed_features(self.backbone(images))

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, width) to the final embedding: the head (if any), then L2 norm."""
        if self.head is not None:
            features = self.head(features)
        return F.normalize(features.float(), dim=1)


# ---------------------------------------------------------------- from a config


def resolve_model_config(model: DictConfig) -> DictConfig:
    """`model` with nothing left to the library: a checkpoint's recorded backbone, or the backbone's own
    preprocessing (size, mean, std, interpolation) wherever the config leaves it null."""
    if model.checkpoint:
        from simsearch.model.checkpoint import checkpoint_backbone

        spec = checkpoint_backbone(Path(model.checkpoint))
        resolved = OmegaConf.merge(model, {"name": spec.name, "weights": spec.weights,
                                           **spec.to_dict()["preprocessing"],
                                           "checkpoint": str(Path(model.checkpoint).resolve())})
        if model.image_size is not None and resolved.image_size != model.image_size:
            log.info("model.image_size=%d from the checkpoint (trained at that size)", resolved.image_size)
        return resolved
    defaults = default_preprocessing(model.name)
    return OmegaConf.merge(model, {
        "image_size": model.image_size if model.image_size is not None else defaults.image_size,
        "mean": list(model.mean) if model.mean is not None else list(defaults.mean),
        "std": list(model.std) if model.std is not None else list(defaults.std),
        "interpolation": model.interpolation or defaults.interpolation,
    })


def backbone_spec(model: DictConfig | dict[str, Any]) -> BackboneSpec:
    """The typed spec of a model config, e.g. {"name": "resnet18", "weights": "random"} (null keys resolved)."""
    if isinstance(model, dict):
        from simsearch.config import ModelConfig

        model = OmegaConf.merge(OmegaConf.structured(ModelConfig), model)
    model = resolve_model_config(model) if _unresolved(model) else model
    family, _ = check_name(model.name)
    for key in ("mean", "std"):
        if len(model[key]) != 3 or (key == "std" and min(model[key]) <= 0):
            kind = "positive numbers" if key == "std" else "numbers"
            raise SimsearchError(f"model.{key} must be three {kind} (R, G, B), not {list(model[key])}")
    if int(model.image_size) < 1:
        raise SimsearchError(f"model.image_size must be positive, not {model.image_size}")
    preprocessing = Preprocessing(int(model.image_size), tuple(model.mean), tuple(model.std),
                                  str(model.get("interpolation") or "bilinear"))
    return BackboneSpec(str(model.name), family, str(model.weights), preprocessing)


def _unresolved(model: DictConfig) -> bool:
    return any(model.get(key) is None for key in ("image_size", "mean", "std"))


def build_backbone(spec: BackboneSpec, seed: int) -> Backbone:
    """The network of `spec` with its weights, classifier removed: (B, 3, S, S) -> (B, width)."""
    network, pooling = build_network(spec, seed)
    family, arch = check_name(spec.name)
    load_weights(network, family, arch, spec.weights, FAMILIES[family].classifier_name(network))
    return remove_classifier(network, family, pooling)


def build_embedder(model: DictConfig, seed: int) -> Embedder:
    """The frozen network a model config describes (a fine-tuned checkpoint when one is named)."""
    if model.checkpoint:
        from simsearch.model.checkpoint import load_finetuned_embedder

        return load_finetuned_embedder(Path(model.checkpoint))
    spec = backbone_spec(model)
    return Embedder(Preprocess.from_spec(spec.preprocessing), build_backbone(spec, seed).network)


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
        from simsearch.data import augment, decode_jpegs_on

        if "encoded" in batch:
            decode_jpegs_on(self.device, batch, self.embedder.preprocess.image_size_px)
        pixels = batch["pixels"]
        if self.augment_seed is not None:
            torch.manual_seed(self.augment_seed * 1_000_003 + batch_idx)
            pixels = augment(pixels, strong=True)
        return {
            "index": batch["index"],
            "valid": batch["valid"],
            "reason": batch["reason"],
            "embeddings": self.embedder(pixels),
        }
