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
from simsearch.metrics import METRICS

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


ELLIPSIS = "\u2026"
CAPTION_FONT_PX = 12


def text_width(text: str, size: int = CAPTION_FONT_PX) -> float:
    return font(size).getlength(text)


def fit_caption(text: str, width_px: float, size: int = CAPTION_FONT_PX) -> str:
    """`text` on one line of at most `width_px`, cut in the middle so its end (the file name) stays:
    "scenes/holidays/2019/rocket.jpg" -> "scenes/ho\u2026/rocket.jpg"; a file name too long on its own
    keeps its start and its end ("rocket_launc\u2026_copy.png"). Never cut at the left edge."""
    text = " ".join(str(text).split())  # newlines and tabs in ids: one line
    if text_width(text, size) <= width_px:
        return text
    name = text.rsplit("/", 1)[-1]
    best = ELLIPSIS
    for keep in range(1, len(text)):  # the most characters that fit (width grows with keep)
        if keep <= len(name):  # only the file name's start and end
            candidate = name[: keep // 2] + ELLIPSIS + name[len(name) - (keep - keep // 2):]
        else:  # the whole file name, and as much of the folders as fits
            candidate = text[: keep - len(name)] + ELLIPSIS + "/" + name
        if text_width(candidate, size) > width_px:
            break
        best = candidate
    return best


def caption_lines(lines: list[str], width_px: float, size: int = CAPTION_FONT_PX) -> str:
    """Each line fitted to the width (middle ellipsis), empty lines left out."""
    return "\n".join(fit_caption(line, width_px, size) for line in lines if line)


METADATA_CAPTION_LINES = 2  # a tile shows as many catalogue values as fit on this many lines


def metadata_pairs(metadata: dict[str, Any] | None) -> list[str]:
    """`["price=45.0", "in_stock=True"]`: an item's catalogue values (null ones left out), each printable."""
    pairs = [f"{name}={value}" for name, value in (metadata or {}).items() if value is not None]
    return [pair if pair.isprintable() else repr(pair) for pair in pairs]


def metadata_line(metadata: dict[str, Any] | None) -> str:
    """`price=45.0 in_stock=True`: an item's catalogue values on one line."""
    return " ".join(metadata_pairs(metadata))


def packed_lines(words: list[str], width_px: float, most: int) -> list[str]:
    """Words packed greedily into at most `most` lines of `width_px`; the rest on the last line, which
    `caption_lines` cuts to fit."""
    lines: list[str] = []
    for word in words:
        if lines and text_width(f"{lines[-1]} {word}") <= width_px:
            lines[-1] = f"{lines[-1]} {word}"
        elif len(lines) < most:
            lines.append(word)
        else:
            lines[-1] = f"{lines[-1]} {word}"
    return lines


def result_caption(neighbour: Any, width_px: float) -> str:
    """A result tile's caption: rank and score, label, id (its file name kept), catalogue values if any."""
    values = metadata_pairs(getattr(neighbour, "metadata", None))  # a value with spaces stays whole
    lines = [f"#{neighbour.rank} {neighbour.score:.3f}", neighbour.label or "", str(neighbour.id),
             *packed_lines(values, width_px, METADATA_CAPTION_LINES)]
    return caption_lines(lines, width_px)


def split_label(caption: str) -> tuple[str, str]:
    """An item query's caption "ID (LABEL)" as (ID, LABEL); any other caption as (caption, "")."""
    head, found, tail = caption.rpartition(" (")
    return (head, tail[:-1]) if found and caption.endswith(")") else (caption, "")


def draw_grid(query_image: Image.Image, query_caption: str, result: Any, images: list[Image.Image],
              tile_px: int = 160, columns: int = 5) -> Image.Image:
    """The query on the left, its top-K in rows to the right, each tile captioned with rank, score,
    label, id and catalogue values; green / red frames mark relevant / irrelevant results when labels exist;
    the title names the filter the results were chosen under."""
    line_px, margin, title_px = CAPTION_FONT_PX + 3, 8, 36
    with_metadata = any(getattr(n, "metadata", None) for n in result.neighbours)
    caption_px = (3 + METADATA_CAPTION_LINES * with_metadata) * line_px + 6
    rows, columns = balanced_grid(len(images), columns)
    labelled = any(getattr(n, "relevant", None) is not None for n in result.neighbours)
    title_px += 18 * labelled  # a line saying what the frames mean
    width = margin + (tile_px + margin) * (max(columns, 4) + 1) + margin  # room for the title at any count
    height = title_px + rows * (tile_px + caption_px + margin) + margin
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((margin, 8), fit_caption(grid_title(query_caption, result), width - 2 * margin, 18), fill="black", font=font(18))
    if labelled:
        draw.text((margin, 30), "frames: blue the query, green its label, red another label", fill="dimgray",
                  font=font(CAPTION_FONT_PX))

    def tile(image: Image.Image, x: int, y: int, caption: str, frame: str | None) -> None:
        canvas.paste(image.convert("RGB").resize((tile_px, tile_px), Image.BICUBIC), (x, y))
        if frame:
            draw.rectangle([x - 3, y - 3, x + tile_px + 2, y + tile_px + 2], outline=frame, width=4)
        draw.multiline_text((x, y + tile_px + 5), caption, fill="black", font=font(CAPTION_FONT_PX), spacing=3)

    tile(query_image, margin, title_px, caption_lines(["query", *reversed(split_label(query_caption))], tile_px), "blue")
    for number, (image, n) in enumerate(zip(images, result.neighbours)):
        x = margin + (tile_px + margin) * (1 + number % columns) + margin
        y = title_px + (number // columns) * (tile_px + caption_px + margin)
        frame = None if n.relevant is None else ("green" if n.relevant else "red")
        tile(image, x, y, result_caption(n, tile_px), frame)
    return canvas


def balanced_grid(count: int, most_columns: int) -> tuple[int, int]:
    """(rows, columns) for `count` tiles, at most `most_columns` a row, rows as even as they can be
    (6 tiles: two rows of 3, not 5 and 1)."""
    rows = max(1, -(-count // most_columns))
    return rows, max(1, -(-count // rows))


def grid_title(query_caption: str, result: Any) -> str:
    """`Query: X   top 8   Precision@8: 0.75   filter: ...`; `no item matches the filter` when none does."""
    title = f"Query: {query_caption}"
    if not result.neighbours:
        title += "   no item matches the filter" if getattr(result, "filter", None) else "   no neighbours"
    else:
        k = getattr(result, "k", None) or len(result.neighbours)
        title += f"   top {len(result.neighbours)}" + (f" of the {k} asked for" if len(result.neighbours) < k else "")
        if result.precision is not None:
            title += f"   Precision@{k}: {result.precision:.2f}"
    if getattr(result, "filter", None):
        title += f"   filter: {result.filter}"
    return title


def groups_sheet_size(groups: list[list[Any]], tile_px: int = 112, per_row: int = 6) -> tuple[int, int]:
    """The duplicates sheet's (width, height): as wide as its largest group (up to per_row), one row per group."""
    caption_px, margin, heading_px = 2 * (CAPTION_FONT_PX + 3) + 4, 8, 20
    widest = max([min(len(group), per_row) for group in groups] or [1])
    width = max(margin + widest * (tile_px + margin), 280)
    height = margin + max(1, len(groups)) * (heading_px + tile_px + caption_px + margin)
    return width, height


def draw_groups(groups: list[list[tuple[Any, int, str, float | None]]], tile_px: int = 112, per_row: int = 6,
                headings: list[str] | None = None) -> Image.Image:
    """One row per group: a heading, then up to `per_row` thumbnails side by side, each captioned with its
    id (file name kept) and its cosine to the group's first item. A group is a list of (ItemImages, row,
    caption, score), score None for the first item."""
    caption_px, margin, heading_px = 2 * (CAPTION_FONT_PX + 3) + 4, 8, 20
    width, height = groups_sheet_size(groups, tile_px, per_row)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for number, group in enumerate(groups):
        y = margin + number * (heading_px + tile_px + caption_px + margin)
        heading = headings[number] if headings else f"group {number + 1}: {len(group)} items"
        if len(group) > per_row:
            heading += f" ({len(group) - per_row} more not shown)"
        draw.text((margin, y), fit_caption(heading, width - 2 * margin, 13), fill=(60, 60, 60), font=font(13))
        y += heading_px
        for column, (images, row, caption, score) in enumerate(group[:per_row]):
            x = margin + column * (tile_px + margin)
            try:
                tile = images.image(row).convert("RGB").resize((tile_px, tile_px), Image.BICUBIC)
            except Exception as error:  # a file gone since extraction: say so in the tile, draw the rest
                log.warning("cannot draw item %s: %s", caption, error)
                tile = placeholder_image(str(error), tile_px)
            canvas.paste(tile, (x, y))
            score_line = "first of the group" if score is None else f"cosine {score:.4f}"
            draw.multiline_text((x, y + tile_px + 3), caption_lines([caption, score_line], tile_px),
                                fill="black", font=font(CAPTION_FONT_PX), spacing=3)
    return canvas


def label_colours(count: int) -> list[tuple[float, float, float, float]]:
    """One colour per label present, the same in the dots, the thumbnail frames and the legend."""
    import matplotlib

    colours = matplotlib.colormaps["tab10" if count <= 10 else "tab20"]
    return [colours(number % colours.N) for number in range(count)]


def map_figure(points: np.ndarray, labels: np.ndarray, classes: list[str], title: str,
               thumbnails: list[tuple[int, Image.Image]] | None = None) -> Any:
    """Scatter plot coloured by label (unlabelled items grey), thumbnails at their points framed in
    their label's colour, a legend of the labels; the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    figure, axes = plt.subplots(figsize=(10, 8))
    size = max(8.0, min(60.0, 60000 / max(len(points), 1)))  # points^2: visible at 10^4 items, not blobs at 100
    unlabelled = labels < 0
    colour_of: dict[int, Any] = {}
    if unlabelled.any():
        axes.scatter(*points[unlabelled].T, s=size, c="lightgrey", label="no label", linewidths=0)
    present = np.unique(labels[~unlabelled]).tolist()
    for label, colour in zip(present, label_colours(len(present))):
        name = classes[label] if label < len(classes) else str(label)
        colour_of[label] = colour
        axes.scatter(*points[labels == label].T, s=size, color=colour, label=name, linewidths=0, alpha=0.85)
    for position, image in thumbnails or []:
        image = image.copy()
        image.thumbnail((48, 48))
        frame = colour_of.get(int(labels[position]), "lightgrey")
        axes.add_artist(AnnotationBbox(OffsetImage(np.asarray(image), zoom=0.75), points[position], frameon=True,
                                       pad=0.15, bboxprops={"edgecolor": frame, "linewidth": 3}))
    if 0 < len(present) <= 30:
        axes.legend(markerscale=max(1.0, 10 / size ** 0.5), fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5),
                    title="label", frameon=False)
    axes.set_title(title, fontsize=11)
    axes.set_xticks([])
    axes.set_yticks([])
    figure.tight_layout()
    return figure


def draw_map(points: np.ndarray, labels: np.ndarray, classes: list[str], title: str, path: Path,
             thumbnails: list[tuple[int, Image.Image]] | None = None) -> None:
    """The map (`map_figure`) saved as a PNG."""
    import matplotlib.pyplot as plt

    figure = map_figure(points, labels, classes, title, thumbnails)
    replace_atomically(path, lambda temporary: figure.savefig(temporary, dpi=120))
    plt.close(figure)


def metric_families(ks: list[int], knn_ks: list[int] | tuple[int, ...] = ()) -> list[tuple[str, list[tuple[str, str]]]]:
    """The metrics table as chart groups: one per per-K metric (its heading, then (K, name) per K of eval.k,
    or of eval.knn_k for kNN accuracy), and one for the metrics without K (heading, name):
    [("Precision@K", [("1", "precision@1"), ...]), ...]."""
    families = [(m.heading, [(str(k), m.name.format(k=k)) for k in (knn_ks if m.ks == "knn_k" else ks)])
                for m in METRICS.values() if m.per_k]
    families = [(heading, members) for heading, members in families if members]
    single = [(m.heading, m.name) for m in METRICS.values() if not m.per_k]
    return families + ([(" and ".join(heading for heading, _ in single), single)] if single else [])


def compared_models(comparison: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """(name, metrics) of each model of a comparison.json, also of a two-model one written before "models" existed."""
    if "models" in comparison:
        return [(row["name"], row["metrics"]) for row in comparison["models"]]
    return [("baseline", comparison["baseline"]), ("fine-tuned", comparison["finetuned"])]


def comparison_figure(comparison: dict[str, Any], ks: list[int], knn_ks: list[int] | tuple[int, ...] = ()) -> Any:
    """One panel per metric family (hit@K, Precision@K, Recall@K, mAP@K, kNN accuracy@K, then MAP@R and
    R-precision), a bar per model in each group with its value printed on it; titled with the data and models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = compared_models(comparison)
    width = 0.8 / len(models)
    families = metric_families(ks, knn_ks)
    columns = min(3, len(families))
    rows = -(-len(families) // columns)
    figure, panels = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows + 0.9), squeeze=False)
    for axes, (heading, members) in zip(panels.flat, families):
        x = np.arange(len(members))
        for i, (name, scores) in enumerate(models):
            values = [scores.get(metric, np.nan) for _, metric in members]
            bars = axes.bar(x + (i - (len(models) - 1) / 2) * width, values, width=width, label=name)
            axes.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7 if len(models) <= 2 else 5, padding=1)
        axes.set_xticks(x, [tick for tick, _ in members], fontsize=8)
        axes.set_ylim(0, 1.12)
        axes.set_title(heading, fontsize=10)
        if "@K" in heading:
            axes.set_xlabel("K", fontsize=8)
    for axes in list(panels.flat)[len(families):]:
        axes.set_visible(False)
    panels.flat[0].legend(fontsize=8, loc="upper left")
    figure.suptitle(comparison_title(comparison), fontsize=10)
    figure.tight_layout()
    return figure


def comparison_title(comparison: dict[str, Any]) -> str:
    data = comparison["data"]
    heading = f"{data['name']} {data['split']} ({data['items']} items)"
    if "models" in comparison:
        return heading + "\n" + "; ".join(f"{row['name']}: {row['description']}" for row in comparison["models"])
    baseline = comparison.get("baseline_model") or f"{comparison.get('baseline_weights', '')} weights"
    tuned = comparison.get("finetuned_model") or "fine-tuned"
    checkpoint = Path(str(comparison.get("checkpoint", ""))).name
    return f"{heading}: baseline {baseline}\nvs fine-tuned {tuned} (checkpoint {checkpoint})"


def comparison_chart(comparison: dict[str, Any], ks: list[int], path: Path, knn_ks: list[int] | tuple[int, ...] = ()) -> None:
    """The comparison (`comparison_figure`) saved as a PNG."""
    import matplotlib.pyplot as plt

    figure = comparison_figure(comparison, ks, knn_ks)
    replace_atomically(path, lambda temporary: figure.savefig(temporary, dpi=120))
    plt.close(figure)
