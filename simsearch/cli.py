"""`simsearch COMMAND [group=choice ...] [key=value ...]`: parse the config, call one stage, report."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from simsearch.config import load_config
from simsearch.errors import SimsearchError

USAGE = """usage: simsearch COMMAND [group=choice ...] [key=value ...]

commands:
  extract   embed a collection into a store (run.dir)
  index     build the FAISS index of a store
  eval      Precision@K, Recall@K, mAP@K, MAP@R of a labelled store, every item a query
  search    top-K neighbours of an item (query=ID or row) or a new image (query=PATH)
  finetune  train a projection head (and optionally the last stages) with a metric-learning loss
  compare   baseline versus fine-tuned on the same test split
  serve     JSON API and web page over a store
  config    print the resolved config

groups: data=cifar10|fashion_mnist|folder|synthetic  model=resnet50|efficientnet_lite0  logger=wandb|none
examples:
  simsearch extract data=folder data.root=~/photos model.image_size=224 run.dir=outputs/photos
  simsearch eval run.dir=outputs/cifar10-test
  simsearch search run.dir=outputs/cifar10-test query=42
"""


def _command(name: str) -> Callable[[DictConfig], object]:
    if name == "extract":
        from simsearch.extract import extract

        return extract
    if name == "config":
        return lambda cfg: print(OmegaConf.to_yaml(cfg, resolve=True), end="")
    from simsearch import commands

    return getattr(commands, name)


KNOWN = ("extract", "index", "eval", "search", "finetune", "compare", "serve", "config")


def _quiet_libraries() -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*predict_dataloader.*num_workers.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not arguments or arguments[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    name, rest = arguments[0], arguments[1:]
    if name not in KNOWN:
        print(f"simsearch: unknown command '{name}' (known: {', '.join(KNOWN)})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        _command(name)(load_config(rest))
    except SimsearchError as error:
        print(f"simsearch {name}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"simsearch {name}: interrupted", file=sys.stderr)
        return 130
    return 0
