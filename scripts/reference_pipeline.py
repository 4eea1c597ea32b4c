"""The plain pipeline the original report describes, kept deliberately plain, as the benchmarks' yardstick:
torchvision transforms per image in DataLoader workers (Resize(224), ToTensor, Normalize), an fp32
ResNet-50 with the fc layer replaced, batches in eval mode, L2-normalise, numpy cosine similarity.

    python scripts/reference_pipeline.py --images 256                    # random CIFAR-shaped images, prints img/s
    python scripts/reference_pipeline.py --npy images.npy --weights W.pth --out plain.npy   # uint8 (N, H, W, 3) images

The second form is the whole-process yardstick of `scripts/bench.py` (section `process`): the same input
and weights as a `simsearch extract` process, its embeddings saved to compare with.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.models import resnet50


class PlainImages(Dataset):
    """uint8 HxWx3 arrays or image paths, transformed one at a time in the workers."""

    def __init__(self, images: Sequence, image_size: int = 224):
        self.images = images
        self.transform = transforms.Compose([
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.images[index]
        image = Image.open(item).convert("RGB") if isinstance(item, (str, Path)) else Image.fromarray(item)
        return self.transform(image)


def plain_model(state_dict: dict | None = None, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = resnet50(weights=None)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.fc = torch.nn.Identity()
    return model.eval()


@torch.no_grad()
def plain_embed(model: torch.nn.Module, images: Sequence, image_size: int = 224, batch_size: int = 64,
                workers: int = 2, device: str = "cpu") -> np.ndarray:
    model = model.to(device)
    loader = DataLoader(PlainImages(images, image_size), batch_size=batch_size, num_workers=workers)
    outputs = []
    for batch in loader:
        features = model(batch.to(device))
        outputs.append(torch.nn.functional.normalize(features, dim=1).cpu().numpy())
    return np.concatenate(outputs)


def plain_similarity(embeddings: np.ndarray) -> np.ndarray:
    return embeddings @ embeddings.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="how many random images (without --npy)")
    parser.add_argument("--npy", type=Path, help="embed these uint8 (N, H, W, 3) images instead")
    parser.add_argument("--weights", type=Path, help="a ResNet-50 state dict (fc included or not); default: seeded random")
    parser.add_argument("--out", type=Path, help="save the embeddings here (.npy)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    arguments = parser.parse_args()
    if arguments.npy:
        images = np.load(arguments.npy, allow_pickle=False)
    else:
        images = np.random.default_rng(0).integers(0, 256, (arguments.images, 32, 32, 3), dtype=np.uint8)
    state = None
    if arguments.weights:
        state = torch.load(arguments.weights, map_location="cpu", weights_only=True)
        state = {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000), **state}
    model = plain_model(state)
    start = time.perf_counter()
    embeddings = plain_embed(model, images, device=arguments.device)
    seconds = time.perf_counter() - start
    if arguments.out:
        np.save(arguments.out, embeddings)
    print(f"{len(embeddings)} images in {seconds:.1f} s: {len(embeddings) / seconds:.1f} images/s on {arguments.device}")


if __name__ == "__main__":
    main()
