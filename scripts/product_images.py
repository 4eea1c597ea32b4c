"""Unlabelled "products" for the label-free demo (`make demo-products`): Fashion-MNIST's test images written as
PNG files into ONE flat folder (no class folders, no label anywhere), as a shop's image dump would be.

    python scripts/product_images.py outputs/products/images [--items 10000]

Written beside and renamed in, so a killed run leaves no half folder; a folder already complete is kept.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from PIL import Image

from simsearch.pixels import FASHION_MNIST_FILES, read_idx

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--root", type=Path, default=FASHION_MNIST, help="Fashion-MNIST's idx files")
    args = parser.parse_args()
    if args.folder.is_dir() and len(list(args.folder.glob("*.png"))) == args.items:
        print(f"{args.folder}: {args.items} product images already there")
        return
    images = read_idx(args.root / FASHION_MNIST_FILES["test"][0])[: args.items]
    partial = args.folder.with_name(args.folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for number, pixels in enumerate(images):
        Image.fromarray(pixels).save(partial / f"product-{number:05d}.png")
    shutil.rmtree(args.folder, ignore_errors=True)
    partial.rename(args.folder)
    print(f"{args.folder}: {len(images)} product images, one flat folder, no labels")


if __name__ == "__main__":
    main()
