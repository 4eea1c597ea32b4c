"""The embedding network: batched preprocessing + frozen ResNet-50 (fc removed) [+ head] + L2 norm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from simsearch.errors import SimsearchError

EMBEDDING_DIM = 2048
IMAGENET_WEIGHTS = {"imagenet": "IMAGENET1K_V2", "imagenet_v1": "IMAGENET1K_V1"}


class Preprocess(nn.Module):
    """uint8 (B, 3, H, W) -> float (B, 3, S, S): resize (antialiased bilinear) and normalise, batched.

    Runs on whatever device the module is on, so a GPU never waits for per-image CPU transforms.
    """

    def __init__(self, image_size_px: int, mean: list[float], std: list[float]):
        super().__init__()
        self.image_size_px = image_size_px
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        images = pixels.float()
        if images.shape[-2:] != (self.image_size_px, self.image_size_px):
            size = (self.image_size_px, self.image_size_px)
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        return (images - self.mean) / self.std


def imagenet_state_dict(variant: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet ResNet-50 weights, from its cache or downloaded there when online."""
    from torchvision.models import ResNet50_Weights

    weights = ResNet50_Weights[IMAGENET_WEIGHTS[variant]]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if cached.is_file():
        return load_state_dict_file(cached)
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except OSError as error:  # URLError, socket errors: offline
        raise SimsearchError(
            f"the ImageNet ResNet-50 weights ({weights.name}) are not in torchvision's cache and could not "
            f"be downloaded ({error}): put {Path(weights.url).name} from {weights.url} at {cached}"
        ) from None


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from `.pth`/`.pt` (weights_only) or `.safetensors`."""
    if not path.is_file():
        raise SimsearchError(f"model.weights={path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt files raise many types
        raise SimsearchError(f"cannot read weights from {path}: {error}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SimsearchError(f"{path} does not hold a state dict")
    return state


def build_backbone(weights: str, seed: int) -> nn.Module:
    """ResNet-50 with the classification layer replaced by identity: (B, 3, S, S) -> (B, 2048)."""
    from torchvision.models import resnet50

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # `random` weights: the same network on every rank and every run
        network = resnet50(weights=None)
    if weights in IMAGENET_WEIGHTS:
        state = imagenet_state_dict(weights)
    elif weights == "random":
        state = None
    else:
        state = load_state_dict_file(Path(weights).expanduser())
    if state is not None:
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        result = network.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        if missing or result.unexpected_keys:
            raise SimsearchError(
                f"model.weights={weights} is not a torchvision ResNet-50 state dict "
                f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
            )
    network.fc = nn.Identity()
    return network


class ProjectionHead(nn.Module):
    """MLP on the normalised 2048-d backbone features: Linear-BN-ReLU-Linear to `dim` (SimCLR's head)."""

    def __init__(self, in_dim: int = EMBEDDING_DIM, hidden_dim: int = 512, dim: int = 128):
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
        """Backbone features (B, 2048) to the final embedding: the head (if any), then L2 norm."""
        if self.head is not None:
            features = self.head(features)
        return F.normalize(features.float(), dim=1)


def build_embedder(model: DictConfig, seed: int) -> Embedder:
    """The frozen network a model config describes (a fine-tuned checkpoint when one is named)."""
    if model.name != "resnet50":
        raise SimsearchError(f"model.name must be resnet50, not '{model.name}'")
    if model.checkpoint:
        from simsearch.finetune import load_finetuned_embedder

        return load_finetuned_embedder(Path(model.checkpoint))
    preprocess = Preprocess(model.image_size, list(model.mean), list(model.std))
    return Embedder(preprocess, build_backbone(model.weights, seed))


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
            from simsearch.data import decode_jpegs_on

            decode_jpegs_on(self.device, batch, self.embedder.preprocess.image_size_px)
        pixels = batch["pixels"]
        if self.augment_seed is not None:
            from simsearch.finetune import augment

            torch.manual_seed(self.augment_seed * 1_000_003 + batch_idx)
            pixels = augment(pixels, strong=True)
        return {
            "index": batch["index"],
            "valid": batch["valid"],
            "reason": batch["reason"],
            "embeddings": self.embedder(pixels),
        }
