"""Every picture, drawn from a real store and read back: captions that keep the file name, the duplicates
sheet sized to its groups with a score per pair, the map's name, legend and framed thumbnails, and the
comparison chart's metric families with their values."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from simsearch.drawing import (
    ELLIPSIS,
    comparison_figure,
    draw_groups,
    fit_caption,
    groups_sheet_size,
    map_figure,
    metric_families,
    result_caption,
    text_width,
)
from simsearch.items import ItemImages
from simsearch.metrics import METRICS
from simsearch.query import Neighbour
from simsearch.stages.map import store_name
from simsearch.store import Store
from tests.helpers import TINY, simsearch


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    """A small labelled store of real pixels (the synthetic collection), made once for this file."""
    out = tmp_path_factory.mktemp("drawing") / "store"
    assert simsearch("extract", "data=synthetic", "data.num_items=12", "model=pixels", "model.image_size=16", *TINY[2:],
                     f"run.dir={out}") == 0
    return Store.open(out)


@pytest.fixture
def drawn_text(monkeypatch):
    """Every string drawn on a PIL image while the test runs."""
    texts = []
    text, multiline = ImageDraw.ImageDraw.text, ImageDraw.ImageDraw.multiline_text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, xy, t, *a, **k: texts.append(t) or text(self, xy, t, *a, **k))
    monkeypatch.setattr(ImageDraw.ImageDraw, "multiline_text",
                        lambda self, xy, t, *a, **k: texts.append(t) or multiline(self, xy, t, *a, **k))
    return texts


@pytest.mark.parametrize("text, starts, ends", [
    ("scenes/holidays/2019/summer/rocket.jpg", "scenes/", "/rocket.jpg"),  # folders cut, the file name kept
    ("scenes/a_very_long_file_name_of_a_rocket_launch_copy.png", "a_very", "copy.png"),  # the name's start and end
    ("no_folder_but_a_remarkably_long_name_indeed.jpeg", "no_folder", ".jpeg"),
])
def test_captions_are_cut_in_the_middle_and_keep_the_file_name(text, starts, ends):
    fitted = fit_caption(text, 140)
    assert text_width(fitted) <= 140 and ELLIPSIS in fitted
    assert fitted.startswith(starts) and fitted.endswith(ends), fitted
    assert fit_caption("cat.png", 140) == "cat.png" and fit_caption("line\nbreak.png", 140) == "line break.png"


def test_a_result_caption_shows_rank_score_label_and_id():
    neighbour = Neighbour(rank=3, row=7, id="scenes/holidays/2019/summer/rocket.jpg", path=None, label="scenes",
                          score=0.98765, relevant=True)
    rank_score, label, item = result_caption(neighbour, 160).split("\n")
    assert rank_score == "#3 0.988" and label == "scenes" and item.endswith("/rocket.jpg") and item.startswith("scenes")


def test_duplicates_sheet_is_sized_to_its_groups_with_a_score_per_pair(synthetic_store, drawn_text):
    images = ItemImages(synthetic_store)
    pair = [(images, 0, "0", None), (images, 1, "1", 0.9991)]
    one, three = draw_groups([pair]), draw_groups([pair] * 3)
    assert one.size == groups_sheet_size([pair]) and three.size == groups_sheet_size([pair] * 3)
    assert three.width == one.width < 400  # two tiles wide, not six
    row_px = three.height - one.height
    assert row_px > 112 and three.height == one.height + 2 * (row_px // 2)  # one row per group, nothing blank
    assert "0\nfirst of the group" in drawn_text and "1\ncosine 0.9991" in drawn_text
    assert "group 3: 2 items" in drawn_text
    pixels = np.asarray(one.convert("L"))
    assert (pixels[one.height - 30:one.height - 8, 8:120] < 128).any()  # caption ink under the first tile


def test_duplicates_cli_sheet_names_each_group(synthetic_store, drawn_text, tmp_path):
    assert simsearch("duplicates", f"run.dir={synthetic_store.dir}", "duplicates.threshold=-1", "duplicates.k=1",
                     "duplicates.show_groups=2", "logger=none") == 0
    assert any(t.startswith("group 1:") and "(cosine >= -1.0)" in t for t in drawn_text)
    assert sum("cosine " in t and "\n" in t for t in drawn_text) >= 1  # a score under a tile


@pytest.mark.slow
def test_map_is_named_after_the_store_with_a_legend_and_framed_thumbnails(synthetic_store, monkeypatch):
    import matplotlib.pyplot as plt

    import simsearch.stages.map as map_stage

    drawn = {}
    monkeypatch.setattr(map_stage, "draw_map", lambda *args: drawn.setdefault("args", args))
    assert simsearch("map", f"run.dir={synthetic_store.dir}", "map.method=tsne", "map.thumbnails=4", "logger=none") == 0
    points, labels, classes, title, _, thumbnails = drawn["args"]
    assert title.startswith(f"synthetic test (store {synthetic_store.dir})\n12 items, TSNE")
    figure = map_figure(points, labels, classes, title, thumbnails)
    axes = figure.axes[0]
    legend = [t.get_text() for t in axes.get_legend().get_texts()]
    assert legend == [classes[label] for label in np.unique(labels)]
    colours = {text.get_text(): handle.get_facecolor()[0][:3]
               for text, handle in zip(axes.get_legend().get_texts(), axes.get_legend().legend_handles)}
    frames = [artist for artist in axes.artists if hasattr(artist, "patch")]
    assert len(frames) == 4
    for (position, _), frame in zip(thumbnails, frames):
        assert np.allclose(frame.patch.get_edgecolor()[:3], colours[classes[labels[position]]])
    assert axes.collections[0].get_sizes()[0] >= 8
    plt.close(figure)


@pytest.mark.slow
def test_a_folder_store_is_named_by_its_data_root(tmp_path):
    from PIL import Image

    root = tmp_path / "my photos"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (20, 20), (80 * i, 40, 40)).save(root / "a" / f"{i}.png")
    assert simsearch("extract", "data=folder", f"data.root={root}", "model=pixels", "model.image_size=8", *TINY[2:],
                     f"run.dir={tmp_path / 'out'}") == 0
    name = store_name(Store.open(tmp_path / "out"))
    assert name == f"{root} (store {tmp_path / 'out'})" and "folder test" not in name


def test_comparison_chart_has_one_panel_per_metric_family_with_values(synthetic_store):
    import matplotlib.pyplot as plt

    from simsearch.config import load_config
    from simsearch.evaluation import evaluate_store

    cfg = load_config([f"run.dir={synthetic_store.dir}", "logger=none", "eval.k=[1,5]"])
    metrics = evaluate_store(synthetic_store, cfg.eval, cfg.index, 0)
    scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
    comparison = {"data": {"name": "synthetic", "split": "test", "items": 12}, "checkpoint": "/runs/x/best.ckpt",
                  "baseline": scalars, "finetuned": {k: min(1.0, v + 0.1) for k, v in scalars.items()},
                  "baseline_model": "resnet50 (random weights)",
                  "finetuned_model": "resnet50 + head, triplet loss, 0 backbone groups unfrozen"}
    figure = comparison_figure(comparison, [1, 5])
    families = metric_families([1, 5])
    panels = [axes for axes in figure.axes if axes.get_visible()]
    assert [axes.get_title() for axes in panels] == [heading for heading, _ in families]
    assert [heading for heading, _ in families][:4] == [m.heading for m in METRICS.values() if m.per_k and m.ks == "k"]
    for axes, (_, members) in zip(panels, families):
        printed = [t.get_text() for t in axes.texts]
        expected = [f"{comparison[key][name]:.2f}" for key in ("baseline", "finetuned") for _, name in members]
        assert printed == expected
    title = figure._suptitle.get_text()
    assert "triplet loss" in title and "best.ckpt" in title and "resnet50 (random weights)" in title
    plt.close(figure)


def test_comparison_chart_of_three_models_has_a_bar_per_model_in_each_group(synthetic_store):
    import matplotlib.pyplot as plt

    from simsearch.config import load_config
    from simsearch.evaluation import evaluate_store
    from simsearch.stages.compare import comparison_table

    cfg = load_config([f"run.dir={synthetic_store.dir}", "logger=none", "eval.k=[1,5]"])
    metrics = evaluate_store(synthetic_store, cfg.eval, cfg.index, 0)
    scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
    rows = [{"name": name, "description": f"model {name}", "checkpoint": None,
             "metrics": {k: max(0.0, v - shift) for k, v in scalars.items()}}
            for name, shift in (("baseline", 0.3), ("head", 0.2), ("end-to-end", 0.0))]
    comparison = {"data": {"name": "synthetic", "split": "test", "items": 12}, "models": rows}
    figure = comparison_figure(comparison, [1, 5])
    panels = [axes for axes in figure.axes if axes.get_visible()]
    for axes, (_, members) in zip(panels, metric_families([1, 5])):
        expected = [f"{row['metrics'][name]:.2f}" for row in rows for _, name in members]
        assert [t.get_text() for t in axes.texts] == expected
    assert [t.get_text() for t in panels[0].get_legend().get_texts()] == ["baseline", "head", "end-to-end"]
    plt.close(figure)
    table = comparison_table(comparison, [1, 5]).splitlines()
    assert table[0].split() == ["metric", "baseline", "head", "end-to-end"]
    p1 = next(line for line in table if line.startswith("precision@1 ")).split()[1:]
    assert [float(v) for v in p1] == pytest.approx([row["metrics"]["precision@1"] for row in rows], abs=1e-4)
    knn_ks = [int(name.split("@")[1]) for name in scalars if name.startswith("knn_accuracy@")]
    with_knn = comparison_table(comparison, [1, 5], knn_ks).splitlines()  # knn_accuracy@K is the longest name
    assert knn_ks and any(line.startswith(f"knn_accuracy@{knn_ks[-1]} ") for line in with_knn)
    assert len({len(line) for line in with_knn}) == 1, "\n".join(with_knn)  # every value right-aligned in its column


@pytest.fixture
def drawn_at(monkeypatch):
    """(x, y, text) of every string drawn on a PIL image while the test runs."""
    placed = []
    text, multiline = ImageDraw.ImageDraw.text, ImageDraw.ImageDraw.multiline_text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text",
                        lambda self, xy, t, *a, **k: placed.append((*xy, t)) or text(self, xy, t, *a, **k))
    monkeypatch.setattr(ImageDraw.ImageDraw, "multiline_text",
                        lambda self, xy, t, *a, **k: placed.append((*xy, t)) or multiline(self, xy, t, *a, **k))
    return placed


def test_six_results_lay_out_as_two_rows_of_three_with_the_frames_explained(synthetic_store, drawn_at, tmp_path):
    grid = tmp_path / "grid.png"
    assert simsearch("search", f"run.dir={synthetic_store.dir}", "query=0", "search.k=6", f"search.grid={grid}",
                     "logger=none") == 0
    captions = {(x, y) for x, y, t in drawn_at if t.splitlines()[0].startswith("#")}  # (PIL's text() may call multiline_text)
    assert len(captions) == 6, drawn_at
    assert len({x for x, _ in captions}) == 3 and len({y for _, y in captions}) == 2
    texts = [t for _, _, t in drawn_at]
    assert any(t.startswith("Query: ") and "top 6" in t and "Precision@6" in t for t in texts), texts
    assert any("green its label" in t and "red another label" in t for t in texts)
    with Image.open(grid) as image:
        assert all(0 <= x < image.width and 0 <= y < image.height for x, y, _ in drawn_at)


def test_an_empty_filtered_result_is_titled_as_such_and_a_short_one_keeps_the_k_asked_for(synthetic_store, drawn_at,
                                                                                           tmp_path, capsys):
    label = synthetic_store.label_name(0)
    assert simsearch("search", f"run.dir={synthetic_store.dir}", "query=0", "search.k=5", f"search.grid={tmp_path / 'a.png'}",
                     "search.filter=label == 'no such label'", "logger=none") == 0
    titles = [t for _, _, t in drawn_at if t.startswith("Query: ")]
    assert titles and "no item matches the filter" in titles[-1] and "Precision@0" not in titles[-1] and "top 0" not in titles[-1]
    drawn_at.clear()
    same = sum(synthetic_store.label_name(row) == label for row in range(len(synthetic_store))) - 1  # the query left out
    assert 0 < same < 5
    assert simsearch("search", f"run.dir={synthetic_store.dir}", "query=0", "search.k=5", f"search.grid={tmp_path / 'b.png'}",
                     f"search.filter=label == '{label}'", "logger=none") == 0
    title = [t for _, _, t in drawn_at if t.startswith("Query: ")][-1]
    assert f"top {same} of the 5 asked for" in title and f"Precision@5: {same / 5:.2f}" in title, title
    assert "+: the query's label" in capsys.readouterr().out


def test_an_unlabelled_store_shows_no_none_for_labels(tmp_path, drawn_at, capsys):
    """A flat folder of products (data.labels=none): the query, the table and the tiles name no label at all."""
    from tests.helpers import PIXELS, write_image

    for number in range(6):
        write_image(tmp_path / "products" / f"product-{number}.png", seed=number)
    assert simsearch("extract", "data=folder", f"data.root={tmp_path / 'products'}", "data.labels=none", *PIXELS,
                     f"run.dir={tmp_path / 'store'}") == 0
    capsys.readouterr()
    assert simsearch("search", f"run.dir={tmp_path / 'store'}", "query=product-0.png", "search.k=3",
                     f"search.grid={tmp_path / 'grid.png'}", "logger=none") == 0
    printed = capsys.readouterr().out
    assert "product-0.png" in printed and "None" not in printed, printed
    drawn = [t for _, _, t in drawn_at]
    assert any(t.startswith("Query: product-0.png") for t in drawn) and not any("None" in t for t in drawn), drawn
