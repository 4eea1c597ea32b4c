"""Every picture simsearch draws: the result grid, the placeholder tile, the duplicates sheet, the
embedding map and the comparison chart. Fonts, captions and layout are made here once."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from simsearch.files import replace_atomically
from simsearch.metrics import metric_names

log = logging.getLogger(__name__)


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def placeholder_image(reason: str, size_px: int = 160) -> Image.Image:
    """A grey tile with the reason written on it, wrapped to fit."""
    tile = Image.new("RGB", (size_px, size_px), (225, 225, 225))
    draw = ImageDraw.Draw(tile)
    text = "\n".join(textwrap.wrap(f"image unavailable: {reason}", width=max(8, size_px // 7))[:10])
    draw.multiline_text((6, 6), text, fill=(90, 90, 90), font=font(11), spacing=2)
    return tile



def draw_grid(query_image: Image.Image, query_caption: str, result: Any, images: list[Image.Image],
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
    draw.text((margin, 8), title, fill="black", font=font(18))

    def tile(image: Image.Image, x: int, y: int, caption: str, frame: str | None) -> None:
        canvas.paste(image.convert("RGB").resize((tile_px, tile_px), Image.BICUBIC), (x, y))
        if frame:
            draw.rectangle([x - 3, y - 3, x + tile_px + 2, y + tile_px + 2], outline=frame, width=4)
        draw.text((x, y + tile_px + 4), caption, fill="black", font=font(12))

    tile(query_image, margin, title_px, "query\n" + query_caption[:24], "blue")
    for number, (image, n) in enumerate(zip(images, result.neighbours)):
        x = margin + (tile_px + margin) * (1 + number % columns) + margin
        y = title_px + (number // columns) * (tile_px + caption_px + margin)
        frame = None if n.relevant is None else ("green" if n.relevant else "red")
        tile(image, x, y, f"#{n.rank} {n.score:.3f}\n{(n.label or n.id)[:22]}", frame)
    return canvas


def draw_groups(groups: list[list[tuple[Any, int, str]]], tile_px: int = 112, per_row: int = 6) -> Image.Image:
    """One row per group: up to `per_row` thumbnails side by side, each captioned with its id.
    A group is a list of (ItemImages, row, caption)."""
    caption_px, margin = 18, 6
    width = margin + per_row * (tile_px + margin)
    height = margin + max(1, len(groups)) * (tile_px + caption_px + margin)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for number, group in enumerate(groups):
        y = margin + number * (tile_px + caption_px + margin)
        for column, (images, row, caption) in enumerate(group[:per_row]):
            x = margin + column * (tile_px + margin)
            try:
                tile = images.image(row).convert("RGB").resize((tile_px, tile_px), Image.BICUBIC)
            except Exception as error:  # a file gone since extraction: say so in the tile, draw the rest
                log.warning("cannot draw item %s: %s", caption, error)
                tile = Image.new("RGB", (tile_px, tile_px), "lightgrey")
            canvas.paste(tile, (x, y))
            draw.text((x, y + tile_px + 2), caption[-20:], fill="black", font=font(11))
        if len(group) > per_row:
            draw.text((width - 60, y + tile_px + 2), f"+{len(group) - per_row} more", fill="red", font=font(11))
    return canvas


def draw_map(points: np.ndarray, labels: np.ndarray, classes: list[str], title: str, path: Path,
             thumbnails: list[tuple[int, object]] | None = None) -> None:
    """Scatter plot coloured by label (unlabelled items grey), optional thumbnails at their points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    figure, axes = plt.subplots(figsize=(10, 8))
    size = max(1.0, min(20.0, 20000 / len(points)))
    unlabelled = labels < 0
    if unlabelled.any():
        axes.scatter(*points[unlabelled].T, s=size, c="lightgrey", label="no label", linewidths=0)
    present = np.unique(labels[~unlabelled])
    colours = plt.get_cmap("tab10" if len(present) <= 10 else "tab20")
    for number, label in enumerate(present.tolist()):
        name = classes[label] if label < len(classes) else str(label)
        axes.scatter(*points[labels == label].T, s=size, color=colours(number % colours.N), label=name, linewidths=0)
    for position, image in thumbnails or []:
        image.thumbnail((48, 48))
        axes.add_artist(AnnotationBbox(OffsetImage(np.asarray(image), zoom=0.6), points[position], frameon=False))
    if 0 < len(present) <= 30:
        axes.legend(markerscale=max(1.0, 8 / size ** 0.5), fontsize=8, loc="best")
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])
    figure.tight_layout()
    replace_atomically(path, lambda temporary: figure.savefig(temporary, dpi=120))
    plt.close(figure)


def comparison_chart(comparison: dict[str, Any], ks: list[int], path: Path) -> None:
    """Grouped bars: hit@K, P@K, R@K, mAP@K for every K, MAP@R and R-precision, baseline beside fine-tuned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = metric_names(ks)
    x = np.arange(len(names))
    figure, axes = plt.subplots(figsize=(max(8, len(names) * 0.7), 4.5))
    for offset, (label, key) in ((-0.2, ("baseline", "baseline")), (0.2, ("fine-tuned", "finetuned"))):
        axes.bar(x + offset, [comparison[key][n] for n in names], width=0.4, label=label)
    axes.set_xticks(x, names, rotation=45, ha="right")
    axes.set_ylim(0, 1)
    axes.set_ylabel("score")
    data = comparison["data"]
    axes.set_title(f"{data['name']} {data['split']} ({data['items']} items): baseline vs fine-tuned")
    axes.legend()
    figure.tight_layout()
    replace_atomically(path, lambda temporary: figure.savefig(temporary, dpi=120))
    plt.close(figure)


