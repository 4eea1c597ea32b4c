"""The Python API, for notebooks and scripts: open a store, search it, show and evaluate the results.

    import simsearch
    store = simsearch.open("outputs/photos")          # or simsearch.extract(data="folder", ...)
    results = store.search("photo.jpg", k=8)           # a row, an item id, a path, a PIL image or a vector
    results.show()                                     # a matplotlib Figure: the query and its neighbours
    store.evaluate(k=[1, 10])                          # the metrics dict of `simsearch eval`

Everything here is a thin layer over the library the CLI's commands call (store, index, query, evaluation, extraction),
configured by the same typed config: `simsearch.open(run_dir, "index.factory=HNSW32")`. Nothing is
logged to W&B unless asked for (`"logger=wandb"`), and Lightning's banners are silenced.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from simsearch.config import GROUPS, load_config, presets
from simsearch.drawing import draw_grid
from simsearch.errors import SimsearchError
from simsearch.evaluation import evaluate_store
from simsearch.index import open_searcher
from simsearch.items import ItemImages
from simsearch.query import (
    Neighbour,
    SearchResult,
    answer,
    parse_query,
    query_encoder,
    result_table,
    single_query_index,
)
from simsearch.runtime import filter_library_warnings
from simsearch.store import Store as StoreFiles

if TYPE_CHECKING:
    from matplotlib.figure import Figure

API_DEFAULTS = ("logger=none",)  # a notebook writes no W&B run unless it says so
QUIET_LOGGERS = ("lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "lightning.fabric", "faiss.loader")


class Results:
    """The neighbours of one query, best first. Iterate for `Neighbour`s (.rank, .id, .path, .label,
    .score, .row, .relevant, .metadata); `show()` draws them, `to_records()` gives plain dicts."""

    def __init__(self, store: Store, result: SearchResult, query_image: Image.Image | int | None, query_caption: str):
        self.store = store
        self.query = result.query
        self.neighbours: list[Neighbour] = result.neighbours
        self.precision = result.precision  # Precision@K when the query is a labelled item of the store
        self._result = result
        self._query_image = query_image  # an image, the row of an item query (drawn when shown), or None
        self._query_caption = query_caption

    def __iter__(self) -> Iterator[Neighbour]:
        return iter(self.neighbours)

    def __len__(self) -> int:
        return len(self.neighbours)

    def __getitem__(self, position: int) -> Neighbour:
        return self.neighbours[position]

    def __repr__(self) -> str:
        return f"Results for {self._query_caption} (k={len(self)}):\n{result_table(self._result)}"

    def to_records(self) -> list[dict[str, Any]]:
        """One plain dict per neighbour (JSON-ready): rank, row, id, path, label, score, relevant."""
        return [asdict(neighbour) for neighbour in self.neighbours]

    def show(self, columns: int = 5, tile_inches: float = 2.0) -> Figure:
        """A matplotlib Figure of the query and its neighbours: the grid `simsearch search` draws (captions
        with rank, score, label and id; relevant results framed green, others red). Displays inline in Jupyter."""
        import matplotlib.pyplot as plt

        images = [self.store.image(n.row) for n in self.neighbours]
        query = self._query_image
        if isinstance(query, int):
            query = self.store.image(query)
        elif query is None:
            query = Image.new("RGB", (32, 32), "lightgrey")
        grid = draw_grid(query, self._query_caption, self._result, images, columns=max(1, columns))
        figure = plt.figure(figsize=(tile_inches * grid.width / 168, tile_inches * grid.height / 168))
        axis = figure.add_axes((0, 0, 1, 1))
        axis.imshow(grid)
        axis.axis("off")
        plt.close(figure)  # shown once, as the value returned, not again by pyplot's inline backend
        return figure


class Store:
    """A store opened for search and evaluation. The files (embeddings memory-mapped, items, labels,
    manifest) are `store.files`; the index and, for image queries, the model are loaded on first use."""

    def __init__(self, files: StoreFiles, cfg: DictConfig):
        self.files = files
        self.cfg = cfg
        self._searcher: Any = None
        self._encoder: Any = None
        self._images: Any = None

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        manifest = self.files.manifest
        return (f"simsearch.Store({str(self.dir)!r}: {len(self)} items, dim {self.dim}, "
                f"{manifest.get('dataset')}/{manifest.get('split')}, weights {manifest.get('weights')})")

    @property
    def dir(self) -> Path:
        return self.files.dir

    @property
    def dim(self) -> int:
        return self.files.dim

    @property
    def embeddings(self) -> np.ndarray:
        """(N, D) unit-norm vectors, memory-mapped (read-only)."""
        return self.files.embeddings

    @property
    def items(self) -> list[dict[str, Any]]:
        return self.files.items

    def image(self, item: int | str) -> Image.Image:
        """The pixels of an item (a row or an id), from its file or its dataset."""
        if self._images is None:
            self._images = ItemImages(self.files)
        return self._images.image(self.files.row_of(item))

    @property
    def metadata(self) -> list[dict[str, Any]]:
        """Each row's catalogue values (`data.metadata`), column -> value (None: no value); [] without one."""
        return self.files.metadata

    def search(self, query: Any, k: int = 10, filter: str | None = None) -> Results:  # noqa: A002 - the word users know
        """The k nearest neighbours of `query` (with `filter`, e.g. "category == 'dress' and price < 50", the
        k nearest among the items it keeps: docs/recommendation.md):

        - `int`: a row of the store (the item itself is left out of its results);
        - `str`: an item id (or a row number), else the path of an image file (or of a .npy vector);
        - `pathlib.Path`: an image file (or a .npy vector);
        - a PIL image: embedded with the store's model (loaded once, on the first such query);
        - a vector: anything numpy reads as D numbers (numpy, list, torch tensor); normalised first.
        """
        query = parse_query(self.files, query)
        result = answer(self.files, self._searcher_once(), query, k, self._encoder_once,
                        self.cfg.search.filter if filter is None else filter)
        shown = query.row if query.kind == "item" else query.image
        return Results(self, result, shown, query.caption)

    def evaluate(self, k: int | Sequence[int] | None = None, gallery: str | Path | Store | None = None) -> dict[str, Any]:
        """Retrieval metrics (hit@K, Precision@K, Recall@K, mAP@K, MAP@R, R-precision, per class), as `simsearch
        eval` computes them: leave-one-out, or this store's items as queries against `gallery` (a run dir or
        an opened store; default `eval.gallery`). `k` defaults to `eval.k`. Returns the dict; writes nothing."""
        eval_cfg = self.cfg.eval if k is None else OmegaConf.merge(self.cfg.eval, {"k": _as_ks(k)})
        gallery = gallery if gallery is not None else (eval_cfg.gallery or None)
        if gallery is not None and not isinstance(gallery, Store):
            gallery = Store(StoreFiles.open(gallery), self.cfg)  # verified, as `simsearch eval` does
        return evaluate_store(self.files, eval_cfg, self.cfg.index, self.cfg.run.seed,
                              gallery=None if gallery is None else gallery.files)

    def _searcher_once(self) -> Any:
        if self._searcher is None:
            with quiet_libraries():
                self._searcher = open_searcher(self.files, single_query_index(self.cfg.index), self.cfg.run.seed)
        return self._searcher

    def _encoder_once(self) -> Any:
        if self._encoder is None:
            with quiet_libraries():
                self._encoder = query_encoder(self.files, self.cfg.serve.device)
        return self._encoder


def _as_ks(k: int | Sequence[int]) -> list[int]:
    ks = [k] if isinstance(k, (int, np.integer)) else list(k)
    if not ks or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in ks):
        raise SimsearchError(f"k must be a positive integer or a list of them, not {k!r}")
    return [int(v) for v in ks]


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Lightning's banners (GPU/TPU available, ...), FAISS's loader lines and known warnings silenced
    for the duration; a progress bar still shows."""
    loggers = [logging.getLogger(name) for name in QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        filter_library_warnings()
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _overrides(arguments: Sequence[str], keywords: dict[str, Any]) -> list[str]:
    """CLI override strings from positional strings and keyword arguments (`run_dir` aside):
    a group choice (`data="folder"`), a section as a dict
    (`model={"weights": "random"}`), or a dotted key through `**{"data.root": ...}`."""
    overrides = [*API_DEFAULTS, *(str(a) for a in arguments)]
    for key, value in keywords.items():
        if key == "run_dir":
            continue  # set on the loaded config: a path needs no override syntax
        elif isinstance(value, dict):
            if key in GROUPS and value.get("name") in presets(key):  # data={"name": "folder"}: configs/data/folder.yaml
                overrides.append(f"{key}={value['name']}")
            overrides += [f"{key}.{name}={_override_value(v)}" for name, v in _flatten(value).items()]
        elif key in GROUPS or "." in key:
            overrides.append(f"{key}={_override_value(value)}")
        else:
            raise SimsearchError(
                f"unknown keyword {key}=: use run_dir=, a group ({', '.join(GROUPS)}), a section as a dict "
                f"({key}={{...}}), or an override string like 'data.root=DIR'"
            )
    return overrides


def _flatten(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in section.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def _override_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, tuple, bool)):
        return json.dumps(list(value) if not isinstance(value, bool) else value)
    return str(value)


def open(run_dir: str | Path, *overrides: str, verify: bool | str = True) -> Store:  # noqa: A001 - simsearch.open
    """Open the store in `run_dir` for search and evaluation; `overrides` are CLI strings
    (`"index.factory=HNSW32"`, `"eval.k=[1,10]"`). Every file is checked against the manifest's sha256
    first (hashed again only when its identity changed); `verify="full"` hashes every file again now;
    `verify=False` skips the files (the manifest's own checksum is always checked), for a store you just wrote."""
    cfg = load_config(_overrides(overrides, {}))
    cfg.run.dir = str(run_dir)
    return Store(StoreFiles.open(run_dir, verify=verify), cfg)


def extract(*overrides: str, **keywords: Any) -> Store:
    """Embed a folder or a dataset into a store, as `simsearch extract` does, and open it.

        simsearch.extract(data="folder", run_dir="outputs/photos", **{"data.root": "~/photos"})
        simsearch.extract("data=fashion_mnist", "data.root=/usr/share/datasets/fashion-mnist", "data.limit=1000")
        simsearch.extract(data={"name": "folder", "root": "photos"}, model={"weights": "random", "image_size": 64})
    """
    from simsearch.extraction import extract_store  # torch and Lightning: only when extracting

    cfg = load_config(_overrides(overrides, keywords))
    if keywords.get("run_dir") is not None:
        cfg.run.dir = str(keywords["run_dir"])
    with quiet_libraries():
        extract_store(cfg)
    return Store(StoreFiles.open(cfg.run.dir), cfg)
