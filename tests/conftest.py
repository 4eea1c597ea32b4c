"""Shared fixtures: each test in its own folder, and the stores many modules read (made once per session).
The helpers are in tests/helpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import (  # noqa: F401 - the names test modules imported from here before tests/helpers.py
    CATEGORIES,
    FASHION_MNIST,
    TINY,
    clustered,
    create_store,
    extract_pixels,
    make_vector_store,
    read_json,
    simsearch,
    simsearch_subprocess,
    write_csv,
    write_folder,
)


@pytest.fixture(scope="session", autouse=True)
def _session_isolated(tmp_path_factory):
    """The stores made once per session are made in a folder of their own too, never with the user's caches."""
    folder = tmp_path_factory.mktemp("session")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("TORCH_HOME", str(folder / "torch-home"))
        patch.setenv("XDG_CACHE_HOME", str(folder / "cache"))
        patch.setenv("WANDB_SILENT", "true")
        yield


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test runs in its own folder, with torchvision's cache there (never the user's)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path.parent / f"{tmp_path.name}-cache"))  # the MAC key of .verified.json
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    forget_torchscript()


# A frozen network leaves 150 (ResNet-18) to 530 (EfficientNet-Lite0) functions in TorchScript's registry; a
# traced raw-pixel model 2 and no weights. Below this many, the registry is left as it is.
TRACED_FUNCTIONS_KEPT = 64


def forget_torchscript() -> None:
    """TorchScript keeps every traced module's code, its frozen weights included, for the life of the process
    (~100 MB per frozen ResNet-50); a suite that extracts hundreds of times in one process would hold them
    all. Between tests nothing frozen is alive, so the registry is emptied (a user's process extracts once)."""
    torch = sys.modules.get("torch")
    if torch is None or len(torch.jit._state._python_cu.get_functions()) < TRACED_FUNCTIONS_KEPT:
        return  # no network traced since the last emptying: a full collection costs ~0.3 s a test
    import gc

    gc.collect()
    torch.jit._state._python_cu.drop_all_functions()
    torch.jit._recursive.concrete_type_store.type_store.clear()
    torch.jit._state._clear_class_state()


# ---------------------------------------------------------------- stores made once per session


@pytest.fixture(scope="session")
def extracted_once(tmp_path_factory):
    """`extracted_once(*arguments)`: the store `simsearch extract ARGUMENTS` makes, extracted once per session
    for each distinct list of arguments (never with data.root: a store records its absolute root). Tests
    only read it; one that changes a store takes `copy_store(extracted_once(...), tmp_path / "store")`."""
    made: dict[tuple[str, ...], Path] = {}

    def extracted(*arguments: str) -> Path:
        if arguments not in made:
            path = tmp_path_factory.mktemp("extracted") / "store"
            assert simsearch("extract", *arguments, f"run.dir={path}") == 0
            made[arguments] = path
        return made[arguments]

    return extracted


# ---------------------------------------------------------------- a store for the hostile probes


@pytest.fixture
def store_dir(tmp_path) -> Path:
    """A folder of 6 tiny images (tmp_path/images) and its raw-pixel store (tmp_path/store), the test's own
    to damage: a fresh pair per test, as the store records the absolute data.root."""
    root = tmp_path / "images"
    write_folder(root)
    assert extract_pixels(root) == 0
    return tmp_path / "store"


# ---------------------------------------------------------------- a shop: photos and a catalogue of them


@pytest.fixture
def shop(tmp_path):
    """Product photos in one folder per category and a catalogue of them (price, stock, brand): one
    catalogue row names no photo, and one photo has no row."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    rows = []
    for c, (category, colour) in enumerate(zip(CATEGORIES, ((200, 30, 30), (30, 200, 30), (30, 30, 200)))):
        (root / category).mkdir(parents=True)
        for i in range(6):
            pixels = np.clip(np.array(colour) + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / category / f"{i}.png")
            if (c, i) != (2, 5):
                rows.append({"path": f"{category}/{i}.png", "category": category, "price": f"{10 + 7 * i + c:.2f}",
                             "in_stock": "true" if i % 2 == 0 else "false", "brand": "acme" if c else "zeta"})
    rows.append({"path": "gone/9.png", "category": "dress", "price": "1.00", "in_stock": "true", "brand": "acme"})
    catalogue = tmp_path / "catalog.csv"
    write_csv(catalogue, rows)
    return root, catalogue, rows


@pytest.fixture(scope="session")
def products(tmp_path_factory):
    """300 clustered vectors with labels and a catalogue (price, stock, brand); every tenth item has none.
    Made once for the session: the tests that take it only read it."""
    vectors, labels = clustered(300, 3, dim=16, spread=2.5, seed=3)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    rng = np.random.default_rng(1)
    metadata = [None if i % 10 == 0 else {"price": float(rng.integers(5, 100)), "in_stock": bool(rng.integers(0, 2)),
                                          "brand": str(rng.choice(["acme", "zeta", "o'hara", 'q"uo\\te']))} for i in range(300)]
    items = [{"id": f"p{i}", "index": i, "label": CATEGORIES[y]} for i, y in enumerate(labels)]
    path = tmp_path_factory.mktemp("products") / "store"
    create_store(path, vectors, labels, items, {"data": {"name": "vectors", "classes": list(CATEGORIES)}, "model": {}},
                 metadata)
    return path, vectors, labels, metadata
