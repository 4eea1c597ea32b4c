"""Batches for `Trainer.predict` and training: collation, the DataModule, augmentation, and the decoding of
JPEG bytes on the model's device."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from simsearch.data.collections import ImageCollection, Resize, prepared_pixels
from simsearch.data.registry import build_collection


def decode_jpegs_on(device: torch.device, batch: dict[str, Any], resize: Resize) -> None:
    """Decode the batch's encoded JPEGs on `device` and resize them into `batch["pixels"]` in place;
    a file the decoder rejects is marked invalid, with the reason, and the rest of the batch goes on."""
    from torchvision.io import ImageReadMode, decode_jpeg

    positions = [i for i, data in enumerate(batch.get("encoded") or []) if data is not None]
    if not positions:
        return
    for position in positions:  # one at a time: a corrupt file must not take its batch down with it
        try:
            image = decode_jpeg(batch["encoded"][position], mode=ImageReadMode.RGB, device=device,
                                apply_exif_orientation=True)
        except RuntimeError as error:
            batch["valid"][position] = False
            batch["reason"][position] = f"JPEG decoding failed: {str(error).splitlines()[0]}"
            continue
        batch["pixels"][position] = prepared_pixels(image, resize).to(batch["pixels"].device)  # as the loader's


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples; a placeholder of an unreadable image takes the batch's pixel size."""
    valid = [s for s in samples if s["valid"]]
    shape = valid[0]["pixels"].shape if valid else samples[0]["pixels"].shape
    pixels = torch.stack(
        [s["pixels"] if s["valid"] else torch.zeros(shape, dtype=torch.uint8) for s in samples]
    )
    batch = {
        "pixels": pixels,
        "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        "valid": torch.tensor([s["valid"] for s in samples], dtype=torch.bool),
        "reason": [s["reason"] for s in samples],
    }
    if any("encoded" in s for s in samples):  # JPEG bytes to decode on the model's device
        batch["encoded"] = [s.get("encoded") for s in samples]
    return batch


class Selection(Dataset):
    """Some items of a collection, in order, each keeping its own index (what a resumed run still needs)."""

    def __init__(self, collection: ImageCollection, indices: np.ndarray):
        self.collection, self.indices = collection, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        return self.collection[int(self.indices[position])]


class ImageDataModule:
    """Serves one collection to `Trainer.predict`, in order; the sampler Lightning adds under DDP splits it.

    A plain class (not a LightningDataModule): importing the data stage must not import Lightning."""

    def __init__(self, data: DictConfig, resize: Resize, seed: int = 0, pin_memory: bool = False,
                 decode_on_device_by_default: bool = False):
        self.decode_on_device_by_default = decode_on_device_by_default
        self.data = data
        self.resize = resize
        self.seed = seed
        self.pin_memory = pin_memory
        self.collection: ImageCollection | None = None
        self.indices: np.ndarray | None = None  # None: every item

    def setup(self, stage: str | None = None) -> None:
        if self.collection is None:
            self.collection = build_collection(self.data, self.resize, self.seed, self.decode_on_device_by_default)

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        workers = self.data.num_workers
        dataset = self.collection if self.indices is None else Selection(self.collection, self.indices)
        return DataLoader(
            dataset,
            batch_size=self.data.batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )


def augment(pixels: torch.Tensor, strong: bool, crop_scale: float | None = None) -> torch.Tensor:
    """Per-image random resized crop (keeping at least `crop_scale` of the area; 1: none) and flip (and colour
    jitter when `strong`), uint8 in and out."""
    from torchvision.transforms import v2

    smallest = crop_scale if crop_scale is not None else (0.35 if strong else 0.6)
    steps = [v2.RandomResizedCrop(pixels.shape[-2:], scale=(smallest, 1.0), antialias=True)] if smallest < 1 else []
    steps += [v2.RandomHorizontalFlip()]
    if strong:
        steps += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
    transform = v2.Compose(steps)
    return torch.stack([transform(image) for image in pixels])
