"""A SYNTHETIC product catalogue for Fashion-MNIST's test split, for the recommendation demo (`make demo-shop`).

Nothing in it is real: each of the 10,000 test images becomes a "product" whose department comes from its
Fashion-MNIST class, and whose brand, price and stock are drawn at random, seeded, so every run writes
the same file. One CSV row per image, keyed by `index` (the image's position in the split):

    index,department,brand,price,in_stock

    python scripts/shop_catalogue.py outputs/shop-catalogue.csv [--items 10000] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from simsearch.files import replace_atomically
from simsearch.pixels import FASHION_MNIST_FILES, read_idx

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Fashion-MNIST's classes 0-9, grouped into departments, with a typical price (the median of the draw)
DEPARTMENTS = [("tops", 15), ("bottoms", 35), ("tops", 40), ("dresses", 45), ("outerwear", 80),
               ("shoes", 50), ("tops", 30), ("shoes", 70), ("bags", 60), ("shoes", 90)]
BRANDS = ["acme", "zeta", "nordwind", "o'hara", "lumen"]


def catalogue_rows(labels: np.ndarray, seed: int) -> list[dict[str, object]]:
    rng = np.random.default_rng(seed)
    rows = []
    for index, label in enumerate(labels.tolist()):
        department, median = DEPARTMENTS[label]
        price = round(float(median * rng.lognormal(0.0, 0.35)), 2)
        rows.append({"index": index, "department": department, "brand": BRANDS[int(rng.integers(len(BRANDS)))],
                     "price": f"{price:.2f}", "in_stock": "true" if rng.random() < 0.7 else "false"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="a seeded, synthetic catalogue for Fashion-MNIST's test images")
    parser.add_argument("out")
    parser.add_argument("--root", default=str(FASHION_MNIST))
    parser.add_argument("--items", type=int, default=None, help="the first N images only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    labels = read_idx(Path(args.root) / FASHION_MNIST_FILES["test"][1])[: args.items]
    rows = catalogue_rows(np.asarray(labels), args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(temporary: Path) -> None:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    replace_atomically(out, write)
    print(f"wrote a synthetic catalogue of {len(rows)} products (seed {args.seed}): {out}")


if __name__ == "__main__":
    main()
