"""A dataset kind decides everything that depends on it: a registered (plugin) dataset gets thumbnails in
`serve`, the right fingerprint, and the folder rules, with no branch on its name anywhere else."""

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simsearch.data import DATASETS, ArrayCollection, register_dataset
from simsearch.data.registry import DatasetKind
from simsearch.store import Store
from tests.helpers import TINY, simsearch

README = Path(__file__).resolve().parent.parent / "README.md"
SIMSEARCH = Path(__file__).resolve().parent.parent / "simsearch"


def stripes(width: int, count: int = 12) -> np.ndarray:
    """`count` 16 x 16 grey images of vertical stripes `width` pixels wide, each shifted by its index."""
    columns = (np.arange(16)[None, :] + np.arange(count)[:, None]) // width % 2 * 255
    return np.repeat(columns[:, None, :], 16, axis=1).astype(np.uint8)


@pytest.fixture
def plugin_datasets():
    """The README's digits example and a dataset with an option of its own, registered as a plugin would;
    the table is as it was afterwards."""
    before = dict(DATASETS)
    text = README.read_text()
    section = text[text.index("## Extending simsearch"):]
    digits = next(block for block in re.findall(r"```python\n(.*?)```", section, flags=re.S) if "register_dataset" in block)
    exec(compile(digits, str(README), "exec"), {})

    @register_dataset("stripes", help="stripes data.native_size_px wide", needs_root=False)
    def load_stripes(data, options):
        return ArrayCollection(stripes(int(data.native_size_px)), np.arange(12) % 2, ["even", "odd"])

    yield
    DATASETS.restore(before)


def test_every_dataset_kind_is_complete():
    """Every entry, built-in or registered, says what the name branches used to decide."""
    for name, kind in DATASETS.items():
        assert isinstance(kind, DatasetKind) and kind.help.strip(), name
        assert callable(kind.load) and callable(kind.source) and callable(kind.images), name
        assert kind.query_gallery is None or set(kind.query_gallery) <= set(kind.splits), name


def test_a_plugin_dataset_gets_thumbnails_in_serve(plugin_datasets, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from sklearn.datasets import load_digits

    from simsearch.config import load_config
    from simsearch.server.app import create_app

    assert simsearch("extract", "data=digits", "data.split=test", "data.limit=20", "model=pixels", "model.image_size=8",
                     *TINY[2:], "run.dir=digits") == 0
    cfg = load_config([f"run.dir={tmp_path / 'digits'}", "logger=none", "serve.device=cpu"])
    with TestClient(create_app(cfg), base_url="http://localhost") as client:
        response = client.get("/items/7/image")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert "x-simsearch-unavailable" not in {key.lower() for key in response.headers}
        thumbnail = np.asarray(Image.open(io.BytesIO(response.content)).convert("L"))
    x, _ = load_digits(return_X_y=True)  # the item's own pixels, as the README's loader makes them
    expected = (x.reshape(-1, 8, 8) * 16).clip(0, 255).astype(np.uint8)[1000 + 7]
    scale = thumbnail.shape[0] // 8  # enlarged by a whole factor, nearest neighbour
    assert thumbnail.shape == (8 * scale, 8 * scale)
    np.testing.assert_array_equal(thumbnail[::scale, ::scale], expected)


def test_a_changed_plugin_option_re_embeds_and_an_unchanged_one_reuses(plugin_datasets, tmp_path):
    common = ["data=stripes", "model=pixels", "model.image_size=16", *TINY[2:]]
    assert simsearch("extract", *common, "data.native_size_px=2", "run.dir=run") == 0
    first = Store.open(tmp_path / "run")
    assert simsearch("extract", *common, "data.native_size_px=2", "run.dir=run") == 0
    assert Store.open(tmp_path / "run").manifest["reused"] == 12  # nothing changed: every vector kept
    assert simsearch("extract", *common, "data.native_size_px=4", "run.dir=run") == 0
    changed = Store.open(tmp_path / "run")
    assert changed.manifest["reused"] == 0 and changed.manifest["embedded"] == 12
    # the vectors of the new stripes (as a fresh run embeds them), not the old ones kept by key
    assert simsearch("extract", *common, "data.native_size_px=4", "run.dir=fresh") == 0
    assert not np.allclose(first.vectors(), changed.vectors(), atol=1e-3)
    np.testing.assert_allclose(changed.vectors(), Store.open(tmp_path / "fresh").vectors(), atol=1e-6)


def test_a_plugin_whose_items_are_files_keeps_run_dir_and_pictures_outside(tmp_path):
    """items_are_files: the folder rule (run.dir not inside data.root) for a registered dataset too."""
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / "a" / f"{i}.png")
    before = dict(DATASETS)
    try:
        register_dataset("myfiles", help="a folder, by another name", items_are_files=True)(DATASETS["folder"].load)
        assert simsearch("extract", "data=myfiles", f"data.root={root}", "model=pixels", "model.image_size=8", *TINY[2:],
                         f"run.dir={root / 'store'}") == 2
        assert simsearch("extract", "data=myfiles", f"data.root={root}", "model=pixels", "model.image_size=8", *TINY[2:],
                         f"run.dir={root / '.simsearch'}") == 0
        assert simsearch("search", f"run.dir={root / '.simsearch'}", "query=a/1.png", "search.k=1",
                         f"search.grid={root / 'grid.png'}", "logger=none") == 2
    finally:
        DATASETS.restore(before)


def test_no_module_outside_the_data_package_branches_on_a_dataset_name():
    """What a dataset's name decides is in its table entry: no `== "folder"`, `in ("folder", "hf")` elsewhere."""
    names = "|".join(("folder", "synthetic", "hf", "cifar10", "fashion_mnist", "webdataset", "inshop", "sop", "cub200",
                      "cars196"))
    branch = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']""")
    offenders = [f"{path.relative_to(SIMSEARCH)}: {line.strip()}" for path in sorted(SIMSEARCH.rglob("*.py"))
                 if "data" not in path.relative_to(SIMSEARCH).parts[:1]
                 for line in path.read_text().splitlines() if branch.search(line)]
    assert offenders == []


def test_the_dataset_table_imports_no_torch():
    code = "import sys, simsearch.data, simsearch.items; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False"]
