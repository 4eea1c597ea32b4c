"""`simsearch map`: a picture of the embedding space, the store's vectors in 2-D (`simsearch.projection`),
coloured by label."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from simsearch.data.registry import DATASETS
from simsearch.drawing import draw_map
from simsearch.errors import SimsearchError
from simsearch.items import ItemImages, output_path
from simsearch.pixels import UnreadableImage
from simsearch.projection import project, sample_rows
from simsearch.store import Store
from simsearch.tracking import finish, log_image, start_run

log = logging.getLogger(__name__)


def store_name(store: Store) -> str:
    """What a user calls the store: a folder's data.root, a dataset's name and split; with its run.dir."""
    manifest, data = store.manifest, store.manifest.get("data", {})
    if data.get("root") and manifest.get("dataset") in DATASETS and DATASETS[manifest["dataset"]].items_are_files:
        return f"{data['root']} (store {store.dir})"
    collection = " ".join(str(part) for part in (manifest.get("dataset"), manifest.get("split")) if part)
    return f"{collection} (store {store.dir})" if collection else str(store.dir)


def embedding_map(cfg: DictConfig) -> Path:
    """`simsearch map`: embedding_map.png in run.dir (logged to W&B), the store's vectors in 2-D."""
    settings, seed = cfg.map, cfg.run.seed
    store = Store.open(cfg.run.dir)
    path = output_path(store, "map.image", settings.image)
    rows = sample_rows(len(store), settings.max_items, seed)
    if len(rows) < len(store):
        print(f"map of {len(rows)} of {len(store)} items, drawn at random with run.seed={seed} (map.max_items)")
    started = time.perf_counter()
    points = project(store.vectors(rows), settings.method, settings.neighbours, seed)
    seconds = time.perf_counter() - started
    thumbnails = []
    if settings.thumbnails > 0:
        images = ItemImages(store)
        chosen = np.random.default_rng(seed).choice(len(rows), size=min(settings.thumbnails, len(rows)), replace=False)
        try:
            thumbnails = [(int(position), images.image(int(rows[position])).convert("RGB")) for position in chosen]
        except (SimsearchError, UnreadableImage) as error:  # the map stands without its thumbnails
            log.warning("map drawn without thumbnails: %s", error)
    manifest = store.manifest
    weights = f"{manifest['weights']} weights, " if manifest.get("weights") not in (None, "none") else ""
    title = f"{store_name(store)}\n{len(rows)} items, {settings.method.upper()} ({weights}dim {store.dim})"
    draw_map(points, store.labels[rows], store.classes, title, path, thumbnails)
    print(f"{settings.method} of {len(rows)} vectors in {seconds:.1f} s. Saved image: {path}")
    run = start_run(cfg, "map")
    log_image(run, "map/embedding_map", path, title)
    finish(run)
    return path
