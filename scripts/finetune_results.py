"""Measure baseline vs fine-tuned on Fashion-MNIST (train split to fine-tune, test split to evaluate)
with `simsearch compare`, and write the figures, the command and the hardware to docs/RESULTS.md.

    python scripts/finetune_results.py                         # CPU defaults below
    python scripts/finetune_results.py --set model.weights=imagenet model.image_size=224 --label gpu
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULTS = [
    "data=fashion_mnist", "data.split=test", "data.limit=10000", "model.weights=random", "model.image_size=64",
    "finetune.loss=supcon", "finetune.epochs=15", "finetune.patience=4", "finetune.resume=false",
    "logger=none", "trainer.enable_progress_bar=false", "run.dir=outputs/results-fashion_mnist",
]
SHOWN = ["precision@1", "precision@10", "recall@10", "map@10", "precision@100", "map@r", "r_precision"]


def hardware() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), platform.processor())
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu} ({torch.get_num_threads()} torch threads){gpu}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for simsearch compare")
    parser.add_argument("--label", default="cpu", help="name of this result's section in docs/RESULTS.md")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "RESULTS.md")
    arguments = parser.parse_args()
    overrides = DEFAULTS + arguments.set
    command = ["simsearch", "compare", *overrides]
    started = time.time()
    subprocess.run([str(Path(sys.executable).parent / "simsearch"), *command[1:]], check=True, cwd=ROOT)
    minutes = (time.time() - started) / 60
    run_dir = ROOT / next(o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("run.dir="))
    comparison = json.loads((run_dir / "comparison.json").read_text())
    tuned_manifest = json.loads((run_dir / "finetuned" / "manifest.json").read_text())
    checkpoint = Path(comparison["checkpoint"])
    meta = json.loads((checkpoint.parent / "finetune.json").read_text())
    lines = [
        f"## Fashion-MNIST, {arguments.label}: baseline vs fine-tuned ({time.strftime('%Y-%m-%d')})",
        "",
        f"- Command: `{shlex.join(command)}` (or `python scripts/finetune_results.py`), {minutes:.1f} min in all.",
        f"- Hardware: {hardware()}.",
        f"- Weights: both models start from `model.weights={comparison['baseline_weights']}`"
        + (" (ImageNet weights cannot be downloaded on the offline machine that measured this; the baseline is"
           " a randomly initialised, seeded ResNet-50)" if comparison["baseline_weights"] == "random" else "")
        + f"; image size {tuned_manifest['image_size']} px.",
        f"- Data: trained on {meta['train_rows']} items of the train split (of its first {comparison['data']['limit']}),"
        f" the other {meta['validation_rows']} held out for model selection; evaluated on {comparison['data']['items']}"
        f" items of the test split, every item a query against the rest.",
        f"- Fine-tuning: loss `{meta['metadata']['loss']}`, head {meta['metadata']['head']['in_dim']}-"
        f"{meta['metadata']['head']['hidden_dim']}-{meta['metadata']['head']['dim']}, "
        f"backbone frozen (unfreeze={meta['metadata']['unfreeze']}), "
        f"{meta['epochs_run']} epochs, best {meta['monitor']} = {meta['best_score']:.4f}.",
        "",
        "| metric | baseline | fine-tuned | change |",
        "|---|---|---|---|",
    ]
    for name in SHOWN:
        b, f = comparison["baseline"][name], comparison["finetuned"][name]
        lines.append(f"| {name} | {b:.4f} | {f:.4f} | {f - b:+.4f} |")
    lines += ["", f"Chart: `{(run_dir / 'comparison.png').relative_to(ROOT)}` (not in git; the command above makes it).", ""]
    section = "\n".join(lines)
    text = arguments.out.read_text() if arguments.out.exists() else "# Measured results\n\n"
    marker = f"## Fashion-MNIST, {arguments.label}:"
    kept = [part for part in text.split("\n## ") if not ("## " + part).startswith(marker)]
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text("\n## ".join(kept).rstrip() + "\n\n" + section)
    print(section)


if __name__ == "__main__":
    main()
