"""Search and recommend: neighbours of an item, a vector or a new image, their pixels, and the result grid.

Nothing here imports torch at module level: a search by item or by vector answers without it, and only
`QueryEncoder` (a search by image) loads the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from simsearch.errors import SimsearchError
from simsearch.evaluate import search_without_self
from simsearch.images import FASHION_MNIST_FILES, SyntheticImages, UnreadableImage, decode_image, read_idx
from simsearch.index import Searcher, resolve_device
from simsearch.store import Store

log = logging.getLogger(__name__)


class QueryEncoder:
    """Embeds new images exactly as the store was embedded: the model and preprocessing in its manifest.

    Built once per process (the model load is the slow part); `encode` then takes any number of images.
    """

    def __init__(self, manifest: dict[str, Any], device: str = "auto"):
        from omegaconf import OmegaConf

        from simsearch.model import build_embedder

        model_cfg = OmegaConf.create(manifest["model"])
        self.image_size_px = int(model_cfg.image_size)
        self.device = resolve_device(device)
        self.embedder = build_embedder(model_cfg, int(model_cfg.get("seed", 0))).eval().to(self.device)
        self.embedder.use_channels_last()
        self.embedder.requires_grad_(False)

    def encode(self, images: list[Image.Image]) -> np.ndarray:
        """(len(images), D) float32 unit-norm embeddings."""
        import torch

        from simsearch.data import pil_to_uint8

        with torch.inference_mode():
            pixels = torch.stack([pil_to_uint8(image, self.image_size_px) for image in images]).to(self.device)
            return self.embedder(pixels).float().cpu().numpy()


class ItemImages:
    """Pixels of the store's items: files under the recorded data root, or the recorded dataset.

    Files, Fashion-MNIST and synthetic items are read without torch; CIFAR-10 goes through torchvision.
    """

    def __init__(self, store: Store):
        self.store = store
        self.data = store.manifest["data"]
        self.root = Path(self.data["root"]).resolve() if self.data.get("root") else None
        self._dataset: Any = None  # anything with .image(index) -> PIL image

    @property
    def records_images(self) -> bool:
        """False for a store of bare vectors (made from Python, say): it has no pixels to show."""
        return self.data.get("name") not in (None, "vectors")

    def path_of(self, row: int) -> Path | None:
        """The file behind a row, guaranteed inside the data root; None for dataset items."""
        relative = self.store.items[row].get("path")
        if relative is None or self.root is None:
            return None
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise SimsearchError(f"item path {relative!r} leaves the data root {self.root}")
        return path

    def image(self, row: int) -> Image.Image:
        path = self.path_of(row)
        if path is not None:
            if not path.is_file():
                raise UnreadableImage(f"{self.store.items[row]['path']} was moved or deleted since extraction")
            return decode_image(path)
        if self._dataset is None:
            self._dataset = self._open_dataset()
        return self._dataset.image(int(self.store.items[row]["index"]))

    def _open_dataset(self) -> Any:
        data, seed = self.data, int(self.store.manifest.get("model", {}).get("seed", 0))
        if data.get("name") == "synthetic":
            return SyntheticImages(int(data["num_items"]), int(data["num_classes"]), int(data["native_size_px"]), seed)
        if data.get("name") == "fashion_mnist" and self.root is not None:
            return ArrayImages(read_idx(self.root / FASHION_MNIST_FILES[data["split"]][0]))
        if data.get("name") in (None, "vectors"):
            raise SimsearchError(f"the store {self.store.dir} records no images, only vectors")
        from omegaconf import OmegaConf

        from simsearch.data import build_collection

        return build_collection(OmegaConf.create({**data, "limit": None}), int(self.store.manifest["model"]["image_size"]), seed)

    def image_or_placeholder(self, row: int) -> tuple[Image.Image, str | None]:
        """The item's image, or a grey tile saying why it cannot be shown (file moved, deleted, unreadable,
        outside the data root, dataset gone), with that reason: a result is never lost for its picture."""
        try:
            return self.image(row), None
        except (UnreadableImage, SimsearchError, OSError) as error:
            reason = str(error)
            return placeholder_image(reason), reason


class ArrayImages:
    """Images held in one uint8 array, (N, H, W) grey or (N, H, W, 3)."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index]).convert("RGB")


def placeholder_image(reason: str, size_px: int = 160) -> Image.Image:
    """A grey tile with the reason written on it, wrapped to fit."""
    import textwrap

    tile = Image.new("RGB", (size_px, size_px), (225, 225, 225))
    draw = ImageDraw.Draw(tile)
    text = "\n".join(textwrap.wrap(f"image unavailable: {reason}", width=max(8, size_px // 7))[:10])
    draw.multiline_text((6, 6), text, fill=(90, 90, 90), font=_font(11), spacing=2)
    return tile


@dataclass
class Neighbour:
    rank: int
    row: int
    id: str
    path: str | None
    label: str | None
    score: float
    relevant: bool | None


@dataclass
class SearchResult:
    query: dict[str, Any]  # id/row/label of an item query, or the path of an image file
    neighbours: list[Neighbour]
    precision: float | None  # Precision@K when the query has a label


def resolve_query(store: Store, query: str) -> tuple[str, Any]:
    """('item', row) for an id or row of the store, ('vector', array) for a .npy file of one vector,
    ('file', path) for an existing image file."""
    _ = store.items  # read first: a damaged or since-replaced items.jsonl is said as such, not as "no such item"
    try:
        return "item", store.row_of(query)
    except SimsearchError:
        path = Path(query).expanduser()
        if path.is_file() and path.suffix.lower() == ".npy":
            return "vector", read_query_vector(path, store.dim)
        if path.is_file():
            return "file", path
        raise SimsearchError(
            f"query={query!r} is neither an item of the store (an id, or a row 0..{len(store) - 1}), "
            "nor a vector (.npy), nor an image file"
        ) from None


def read_query_vector(path: Path, dim: int) -> np.ndarray:
    """One query vector from a .npy file (no pickle), checked against the store's width."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise SimsearchError(f"cannot read the query vector {path}: {error}") from None
    return as_query_vector(array, dim)


def as_query_vector(vector: Any, dim: int) -> np.ndarray:
    """A (D,) or (1, D) finite vector as unit-norm float32 (1, D): the store's vectors are unit norm."""
    array = np.asarray(vector, dtype=np.float32)
    if array.size != dim or array.ndim > 2:
        raise SimsearchError(f"a query vector must have the store's {dim} values, not shape {array.shape}")
    array = array.reshape(1, dim)
    norm = float(np.linalg.norm(array))
    if not np.isfinite(norm) or norm == 0:
        raise SimsearchError("a query vector must be finite and not all zeros")
    return array / norm


def neighbours_of(store: Store, searcher: Searcher, vector: np.ndarray, k: int, own_row: int | None,
                  query_label: int | None) -> SearchResult:
    if not 1 <= k <= len(store) - (own_row is not None):
        raise SimsearchError(f"k={k} is out of range: 1..{len(store) - (own_row is not None)} for this store")
    vector = vector.reshape(1, -1).astype(np.float32)
    if own_row is None:
        scores, rows = searcher.search(vector, k)
    else:
        scores, rows = search_without_self(searcher, vector, np.array([own_row]), k)
    labelled = query_label is not None and query_label >= 0
    neighbours = []
    for rank, (row, score) in enumerate(zip(rows[0].tolist(), scores[0].tolist()), start=1):
        if row < 0:
            continue
        item = store.items[row]
        relevant = bool(store.labels[row] == query_label) if labelled else None
        neighbours.append(Neighbour(rank, row, str(item["id"]), item.get("path"), store.label_name(row), score, relevant))
    precision = sum(bool(n.relevant) for n in neighbours) / k if labelled else None
    return SearchResult({}, neighbours, precision)


def search_item(store: Store, searcher: Searcher, row: int, k: int) -> SearchResult:
    result = neighbours_of(store, searcher, store.vectors(np.array([row])), k, row, int(store.labels[row]))
    item = store.items[row]
    result.query = {"row": row, "id": str(item["id"]), "path": item.get("path"), "label": store.label_name(row)}
    return result


def search_vector(store: Store, searcher: Searcher, vector: np.ndarray, k: int) -> SearchResult:
    """Neighbours of any vector of the store's width (normalised first)."""
    result = neighbours_of(store, searcher, as_query_vector(vector, store.dim), k, None, None)
    result.query = {"vector": True}
    return result


def search_image(store: Store, searcher: Searcher, encoder: QueryEncoder, image: Image.Image, k: int,
                 name: str) -> SearchResult:
    result = neighbours_of(store, searcher, encoder.encode([image]), k, None, None)
    result.query = {"file": name}
    return result


# ---------------------------------------------------------------- the grid


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_grid(query_image: Image.Image, query_caption: str, result: SearchResult, images: list[Image.Image],
              tile_px: int = 160, columns: int = 5) -> Image.Image:
    """The query on the left, its top-K in rows to the right, each tile captioned with score and label;
    green / red frames mark relevant / irrelevant results when labels exist."""
    caption_px, margin, title_px = 34, 8, 36
    rows = max(1, -(-len(images) // columns))
    width = margin + (tile_px + margin) * (columns + 1) + margin
    height = title_px + rows * (tile_px + caption_px + margin) + margin
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    title = f"Query: {query_caption}   top {len(result.neighbours)}"
    if result.precision is not None:
        title += f"   Precision@{len(result.neighbours)}: {result.precision:.2f}"
    draw.text((margin, 8), title, fill="black", font=_font(18))

    def tile(image: Image.Image, x: int, y: int, caption: str, frame: str | None) -> None:
        canvas.paste(image.convert("RGB").resize((tile_px, tile_px), Image.BICUBIC), (x, y))
        if frame:
            draw.rectangle([x - 3, y - 3, x + tile_px + 2, y + tile_px + 2], outline=frame, width=4)
        draw.text((x, y + tile_px + 4), caption, fill="black", font=_font(12))

    tile(query_image, margin, title_px, "query\n" + query_caption[:24], "blue")
    for number, (image, n) in enumerate(zip(images, result.neighbours)):
        x = margin + (tile_px + margin) * (1 + number % columns) + margin
        y = title_px + (number // columns) * (tile_px + caption_px + margin)
        frame = None if n.relevant is None else ("green" if n.relevant else "red")
        tile(image, x, y, f"#{n.rank} {n.score:.3f}\n{(n.label or n.id)[:22]}", frame)
    return canvas


def result_table(result: SearchResult, missing: list[str | None] | None = None) -> str:
    """One line per neighbour; `missing[i]`, when given, says why neighbour i's image cannot be shown."""
    lines = [f"{'rank':>4}  {'score':>7}  {'label':<14}  id"]
    for n, reason in zip(result.neighbours, missing or [None] * len(result.neighbours)):
        mark = "" if n.relevant is None else (" +" if n.relevant else " -")
        note = f"  (image unavailable: {reason})" if reason else ""
        shown = n.id if n.id.isprintable() else repr(n.id)  # a newline in a file name stays on its line
        lines.append(f"{n.rank:>4}  {n.score:>7.4f}  {str(n.label):<14}  {shown}{mark}{note}")
    return "\n".join(lines)
