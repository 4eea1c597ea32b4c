"""How far each CPU inference path is from fp32 eager, on real images: the measurement behind the CPU
default (fp32; frozen where it matches). For each backbone: eager fp32 (the reference), frozen fp32,
eager bf16 autocast and frozen bf16, on scikit-image's photos and on Fashion-MNIST test images; the
minimum and median cosine of each path to the reference. Prints a table and writes JSON.

    python scripts/precision_check.py [--images 256] [--out docs/bench/precision.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simsearch.config import load_config
from simsearch.data import resize_pixels, to_pixels
from simsearch.model import build_embedder, resolve_model_config
from simsearch.model.inference import prepare_inference
from simsearch.model.query import autocast_for
from simsearch.pixels import FASHION_MNIST_FILES, read_idx

BACKBONES = {  # ResNet-50's ImageNet weights cannot be downloaded here: its network runs with random ones
    "efficientnet_lite0 (ImageNet)": ["model=efficientnet_lite0", "model.image_size=224"],
    "resnet50 (random weights)": ["model=resnet50", "model.weights=random", "model.image_size=224"],
}
PATHS = {"frozen fp32": ("frozen", "32-true"), "eager bf16": ("eager", "bf16-mixed"), "frozen bf16": ("frozen", "bf16-mixed")}


def photos() -> list[Image.Image]:
    import skimage.data

    names = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field", "immunohistochemistry",
             "motorcycle_left", "retina", "cat", "colorwheel", "page", "horse", "moon", "text", "coins")
    images = []
    for name in names:
        try:
            images.append(Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB"))
        except Exception:  # a photo that needs pooch (a download) is left out
            continue
    return images


def fashion(count: int) -> list[Image.Image]:
    root = Path("/usr/share/datasets/fashion-mnist")
    return [Image.fromarray(a).convert("RGB") for a in read_idx(root / FASHION_MNIST_FILES["test"][0])[:count]]


def embed(model_cfg, images: list[Image.Image], path: str, precision: str) -> np.ndarray:
    embedder = build_embedder(model_cfg, 0).eval()
    used_precision, used_path = prepare_inference(embedder, path, precision, True, on_gpu=False)
    embedder.use_channels_last()
    pixels = torch.stack([resize_pixels(to_pixels(image), embedder.preprocess.resize) for image in images])
    out = []
    with torch.inference_mode(), autocast_for(used_precision if used_path == "eager" else "32-true", "cpu"):
        for start in range(0, len(pixels), 32):
            out.append(embedder(pixels[start : start + 32]).float().numpy())
    return np.concatenate(out), used_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="Fashion-MNIST test images")
    parser.add_argument("--out", default="docs/bench/precision.json")
    args = parser.parse_args()
    sets = {"photos": photos(), "fashion-mnist": fashion(args.images)}
    rows = []
    started = time.time()
    for backbone, overrides in BACKBONES.items():
        model_cfg = resolve_model_config(load_config([*overrides, "logger=none"]).model)
        for set_name, images in sets.items():
            reference, _ = embed(model_cfg, images, "eager", "32-true")
            for name, (path, precision) in PATHS.items():
                vectors, used = embed(model_cfg, images, path, precision)
                cosine = (vectors.astype(np.float64) * reference).sum(axis=1)
                rows.append({"backbone": backbone, "images": f"{set_name} ({len(images)})", "path": name,
                             "ran": used, "min_cosine": float(cosine.min()), "median_cosine": float(np.median(cosine)),
                             "below_0.999": float((cosine < 0.999).mean())})
                print(f"{backbone:<30} {rows[-1]['images']:<20} {name:<12} ran {used:<7} "
                      f"min {cosine.min():.5f}  median {np.median(cosine):.5f}  below 0.999: {rows[-1]['below_0.999']:.0%}",
                      flush=True)
    record = {"rows": rows, "seconds": round(time.time() - started, 1), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "load_average_at_start": os.getloadavg()[0]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
