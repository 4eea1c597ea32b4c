"""`simsearch search`: the neighbours of an item, a vector or a new image, printed and drawn as a grid.
The query logic is the library's (`simsearch.query`); this command reads its config, prints and draws."""

from __future__ import annotations

import logging

from omegaconf import DictConfig
from PIL import Image

from simsearch.drawing import draw_grid
from simsearch.errors import SimsearchError
from simsearch.files import replace_atomically
from simsearch.index import open_searcher
from simsearch.items import ItemImages, output_path
from simsearch.query import SearchResult, answer, parse_query, query_encoder, result_table, single_query_index
from simsearch.selection import select
from simsearch.store import Store
from simsearch.tracking import finish, log_image, start_run

log = logging.getLogger(__name__)


def search(cfg: DictConfig) -> SearchResult:
    """Top-K of `search.query` (an item id/row, a .npy vector or an image file), printed and drawn as a grid.
    The W&B run starts after the answer."""
    if cfg.search.query is None:
        raise SimsearchError("say what to search for: query=ID (an item of the store), query=PATH (an image file) "
                             "or query=VECTOR.npy")
    store = Store.open(cfg.run.dir)
    grid_path = output_path(store, "search.grid", cfg.search.grid)
    query = parse_query(store, str(cfg.search.query))
    selection = select(store, cfg.search.filter)  # parsed once; a bad filter is said before the index is opened
    searcher = open_searcher(store, single_query_index(cfg.index), cfg.run.seed)
    result = answer(store, searcher, query, cfg.search.k, lambda: query_encoder(store, cfg.serve.device), selection)
    label = f"  label: {result.query['label']}" if result.query.get("label") is not None else ""
    print({"item": f"Query Image Index: {query.row}  id: {result.query.get('id')}{label}",
           "vector": f"Query vector: {cfg.search.query}", "image": f"Query image: {cfg.search.query}"}[query.kind])
    pixels = ItemImages(store)
    tiles = [pixels.image_or_placeholder(n.row) for n in result.neighbours] if pixels.records_images else []
    print(result_table(result, [reason for _, reason in tiles] or None), flush=True)
    if cfg.search.filter:
        print(f"Filter: {cfg.search.filter}", flush=True)
    if result.precision is not None:
        print(f"Precision@{cfg.search.k}: {result.precision:.2f}", flush=True)
    if not pixels.records_images:  # the answer stands without its picture
        log.warning("no grid drawn: the store %s records no images, only vectors", store.dir)
        return result
    query_image = query.image if query.kind == "image" else Image.new("RGB", (32, 32), "lightgrey")
    if query.kind == "item":
        query_image, missing = pixels.image_or_placeholder(query.row)
        if missing:
            log.warning("the query's image cannot be shown: %s", missing)
    grid = draw_grid(query_image, query.caption, result, [image for image, _ in tiles])
    replace_atomically(grid_path, grid.save)
    print(f"Saved image: {grid_path}")
    run = start_run(cfg, "search")
    log_image(run, "search/recommendations", grid_path, query.caption)
    if run is not None and result.precision is not None:
        run.summary[f"search/precision@{cfg.search.k}"] = result.precision
    finish(run)
    return result
