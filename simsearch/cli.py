"""`simsearch COMMAND [group=choice ...] [key=value ...]`: a table of commands, each a stage function.

The CLI parses the config and calls one stage; the usage is generated from the tables (commands,
datasets, model presets). A stage module is imported only when its command runs, so `simsearch search
query=ID` never pays for torch.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

from omegaconf import DictConfig, OmegaConf

from simsearch.config import config_dir, load_config, presets
from simsearch.errors import SimsearchError
from simsearch.registry import Registry
from simsearch.runtime import filter_library_warnings


@dataclass(frozen=True)
class Command:
    help: str
    target: str | Callable[[DictConfig], object]  # "module:function", imported when the command runs; or the function
    example: str = ""

    def function(self) -> Callable[[DictConfig], object]:
        if callable(self.target):
            return self.target
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


COMMANDS: Registry[Command] = Registry("command", "command")
for _name, _command in {
    "extract": Command("embed a collection into a store (run.dir)", "simsearch.stages.extract:extract",
                       "simsearch extract data=folder data.root=~/photos run.dir=outputs/photos"),
    "index": Command("build the FAISS index of a store", "simsearch.stages.index:index",
                     "simsearch index run.dir=outputs/photos index.factory=HNSW32"),
    "eval": Command("hit@K, Precision@K, Recall@K, mAP@K, MAP@R: leave-one-out, or against eval.gallery=RUN_DIR",
                    "simsearch.stages.evaluate:evaluate", "simsearch eval run.dir=outputs/cifar10-test"),
    "search": Command("top-K neighbours of an item (query=ID or row), an image (query=PATH) or a vector (query=V.npy)",
                      "simsearch.stages.search:search", "simsearch search run.dir=outputs/cifar10-test query=42"),
    "duplicates": Command("groups of near-identical items (duplicates.against=OTHER_RUN_DIR: leakage)",
                          "simsearch.stages.duplicates:duplicates", "simsearch duplicates run.dir=outputs/photos"),
    "map": Command("the embeddings in 2-D (UMAP or t-SNE), coloured by label: embedding_map.png",
                   "simsearch.stages.map:embedding_map", "simsearch map run.dir=outputs/photos"),
    "finetune": Command("train a projection head (and optionally the last stages) with a metric-learning loss",
                        "simsearch.stages.finetune:finetune", "simsearch finetune data=fashion_mnist data.split=train"),
    "compare": Command("frozen baseline versus fine-tuned on the same test split", "simsearch.stages.compare:compare",
                       "simsearch compare data=fashion_mnist model=efficientnet_lite0"),
    "serve": Command("JSON API and web page over a store", "simsearch.stages.serve:serve",
                     "simsearch serve run.dir=outputs/photos"),
    "export": Command("the store as clip-retrieval's img_emb/ + metadata/ (export.format=clip-retrieval) or one Parquet table",
                      "simsearch.stages.export:export",
                      "simsearch export run.dir=outputs/photos export.format=clip-retrieval export.dir=outputs/photos-emb"),
    "config": Command("print the resolved config (required keys shown as ???)", "simsearch.cli:print_config",
                      "simsearch config data=folder"),
}.items():
    COMMANDS.add(_name, _command)

PLUGINS_VARIABLE = "SIMSEARCH_PLUGINS"


def register_command(name: str, help: str, example: str = "") -> Callable:  # noqa: A002 - the usage's word
    """`@register_command("count", help=...)` on `fn(cfg)`: `simsearch count ...` then runs it, with the same
    config, errors and exit codes as every command, and the usage lists it."""

    def register(function: Callable[[DictConfig], object]) -> Callable[[DictConfig], object]:
        COMMANDS.add(name, Command(help, function, example))
        return function

    return register  # modules to import first: they register families, datasets, metrics, losses


def print_config(cfg: DictConfig) -> None:
    from simsearch.data.registry import dataset_kind  # the one table of datasets

    dataset_kind(cfg.data.name)  # an unknown data=NAME is refused here, as by any command that reads data
    print(OmegaConf.to_yaml(cfg, resolve=False), end="")


def usage() -> str:
    from simsearch.data.registry import DATASETS  # the one table of datasets

    width = max(map(len, [*COMMANDS, *DATASETS])) + 2  # one column for both tables: a long name never runs into its text
    lines = ["usage: simsearch COMMAND [-v] [group=choice ...] [experiment=NAME] [key=value ...]",
             "  -v, --verbose: also say what each step is doing (INFO log lines)", "", "commands:"]
    lines += [f"  {name:<{width}}{command.help}" for name, command in COMMANDS.items()]
    lines += ["", "datasets (data=NAME):"] + [f"  {name:<{width}}{kind.help}" for name, kind in DATASETS.items()]
    lines += ["", f"groups: data=NAME (presets: {'|'.join(presets('data'))})",
              f"        model={'|'.join(presets('model'))} (or model.name=<torchvision name>, timm/<name>, pixels)",
              f"        logger={'|'.join(presets('logger'))}  trainer={'|'.join(presets('trainer'))}  "
              f"index={'|'.join(presets('index'))}  finetune={'|'.join(presets('finetune'))}",
              f"        experiment={'|'.join(presets('experiment'))} (a whole recipe; the command line wins)",
              f"        (the files: {config_dir()}; docs/configuration.md)", "", "examples:"]
    lines += [f"  {command.example}" for command in COMMANDS.values() if command.example][:4]
    return "\n".join(lines) + "\n"


def load_plugins() -> None:
    """Import the modules named in $SIMSEARCH_PLUGINS and the `simsearch.plugins` entry points: registering a
    family, dataset, metric or loss there makes it available to every command."""
    names = [name.strip() for name in os.environ.get(PLUGINS_VARIABLE, "").split(",") if name.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise SimsearchError(f"{PLUGINS_VARIABLE}={name}: cannot import it ({error}): put it on PYTHONPATH") from None
    for entry in entry_points(group="simsearch.plugins"):
        entry.load()


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0
    verbose = any(a in ("-v", "--verbose") for a in arguments)
    arguments = [a for a in arguments if a not in ("-v", "--verbose")]
    if not arguments:
        print(usage(), end="")
        return 0
    name, rest = arguments[0], arguments[1:]
    try:
        command = COMMANDS[name]
    except SimsearchError as error:  # the registry's sentence: the unknown name and the known ones
        print(f"simsearch: {error}", file=sys.stderr)
        return 2
    # what simsearch is doing (INFO) only when asked; warnings and errors always
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    filter_library_warnings()
    try:
        load_plugins()
        cfg = load_config(rest, allow_missing=name == "config")
        command.function()(cfg)
    except SimsearchError as error:
        print(f"simsearch {name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"simsearch {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as error:  # a full disk, a name too long, a folder that vanished: what failed, in one sentence
        where = f": {str(error.filename)[:200]}" if error.filename else ""
        print(f"simsearch {name}: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2
    return 0
