"""Helpers the test modules share: the CLI run in-process or as a script, stores of known vectors, brute-force
references, image folders, and the server under test (a test client or a live uvicorn). Fixtures are in
conftest.py; nothing here is a test."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from simsearch.cli import main
from simsearch.store import Store, create_store

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Small and fast, but the same entry point and code path a user runs.
TINY = [
    "model.weights=random",
    "model.image_size=32",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "data.num_workers=0",
]
# Synthetic stores through the default network, each extracted once per session (conftest's `extracted_once`)
SYNTHETIC_8 = ("data=synthetic", "data.num_items=8", *TINY)
SYNTHETIC_24 = ("data=synthetic", "data.num_items=24", *TINY)


def simsearch(*arguments: str) -> int:
    """Run the CLI in this process, as `simsearch ARGUMENTS` would."""
    return main(list(arguments))


def simsearch_subprocess(*arguments: str, cwd: Path | None = None, env: dict | None = None,
                         timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed console script in a new process (needed for DDP and exit codes)."""
    script = Path(sys.executable).parent / "simsearch"
    return subprocess.run([str(script), *arguments], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def make_vector_store(path: Path, embeddings: np.ndarray, labels: np.ndarray,
                      classes: list[str] | None = None) -> Store:
    """A store of given vectors (normalised here), for evaluation and index tests without a model."""
    embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    classes = classes or [f"c{i}" for i in range(int(labels.max()) + 1)]
    items = [{"id": f"item{i}", "index": i, "label": classes[y] if y >= 0 else None} for i, y in enumerate(labels)]
    description = {"data": {"name": "vectors", "classes": classes}, "model": {}}
    return create_store(path, embeddings.astype(np.float32), labels.astype(np.int64), items, description)


def clustered(n: int, classes: int, dim: int = 32, spread: float = 0.6, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, size=n)
    return centres[labels] + spread * rng.normal(size=(n, dim)), labels


def copy_store(store_dir: Path, to: Path) -> Path:
    """A copy of a store (a store made once per session stays as it was; the test damages its copy)."""
    shutil.copytree(store_dir, to, symlinks=True)
    return to


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def served_app(store_dir, *overrides):
    """The server's app for a store, as `simsearch serve run.dir=STORE_DIR` builds it (needs fastapi)."""
    from simsearch.config import load_config
    from simsearch.server.app import create_app

    return create_app(load_config([f"run.dir={store_dir}", "logger=none", "serve.device=cpu", *overrides]))


def client_for(store_dir, *overrides):
    from fastapi.testclient import TestClient

    return TestClient(served_app(store_dir, *overrides), base_url="http://localhost")  # a Host the server answers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LiveServer:
    """The server on a free loopback port in a thread, as uvicorn runs it: `with LiveServer(store) as url`."""

    def __init__(self, store_dir: Path, *overrides: str):
        import uvicorn

        self.port = free_port()
        self.app = app = served_app(store_dir, *overrides)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


PHOTOS = {"animals": ("chelsea", "astronaut", "hubble_deep_field"),  # not data.cat(): the same photo as chelsea
          "things": ("coffee", "rocket", "camera", "coins", "colorwheel")}


def write_photo_folder(root: Path, size_px: int = 96) -> dict[str, np.ndarray]:
    """Real photos from scikit-image, small, in one folder per label; returns their pixels by item id."""
    import skimage.data

    written = {}
    for label, names in PHOTOS.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for name in names:
            image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
            image.thumbnail((size_px, size_px))
            image.save(root / label / f"{name}.png")
            written[f"{label}/{name}.png"] = np.asarray(image)
    return written


def write_cifar10(root: Path, per_batch: int = 6) -> np.ndarray:
    """CIFAR-10's on-disk format: pickled dicts (Python 2 str keys, which torchvision reads as str)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]
    test_images = None
    for name in names:
        images = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        batch = {"batch_label": name, "labels": list(range(per_batch)), "data": images,
                 "filenames": [f"{i}.png" for i in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        test_images = images if name == "test_batch" else test_images
    labels = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": labels}, protocol=2))
    return test_images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def ranking_metrics(relevant: list[bool], ks: list[int]) -> dict[str, float] | None:
    """Every metric of one query from its ranked list of relevance flags, written as plainly as possible."""
    R = sum(relevant)
    if R == 0:
        return None
    values = {}
    for K in ks:
        hits = sum(relevant[:K])
        values[f"hit@{K}"] = 1.0 if hits > 0 else 0.0
        values[f"precision@{K}"] = hits / K
        values[f"recall@{K}"] = hits / R
        precisions = [sum(relevant[: i + 1]) / (i + 1) for i in range(K) if relevant[i]]
        values[f"map@{K}"] = sum(precisions) / len(precisions) if precisions else 0.0
    values["map@r"] = sum(sum(relevant[: i + 1]) / (i + 1) for i in range(R) if relevant[i]) / R
    values["r_precision"] = sum(relevant[:R]) / R
    return values


def mean_of(per_query: list[dict[str, float]]) -> dict[str, float]:
    return {name: float(np.mean([q[name] for q in per_query])) for name in per_query[0]}


def reference_query_gallery(queries: np.ndarray, query_names: list, gallery: np.ndarray, gallery_names: list,
                            ks: list[int]) -> dict[str, float]:
    """Query/gallery by brute force: every gallery item ranked for every query (ties by gallery row), no
    exclusion, relevance by class name."""
    per_query = []
    for vector, name in zip(queries, query_names):
        scores = gallery @ vector
        ranked = sorted(range(len(gallery)), key=lambda j: -scores[j])
        values = ranking_metrics([gallery_names[j] == name for j in ranked], ks) if name is not None else None
        if values is not None:
            per_query.append(values)
    return mean_of(per_query)


CATEGORIES = ("dress", "shirt", "shoe")


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def extract_shop(root, catalogue, run_dir="store"):
    return simsearch("extract", "data=folder", f"data.root={root}", f"data.metadata={catalogue}", "model=pixels",
                     "model.image_size=8", *TINY[2:], f"run.dir={run_dir}")


def brute_force(vectors, keep, query, k, own=None):
    """The top-k rows among `keep` (a boolean mask) by inner product, ties by row: a plain numpy loop."""
    rows = [r for r in np.flatnonzero(keep) if r != own]
    scores = vectors[rows] @ query
    order = sorted(range(len(rows)), key=lambda i: (-scores[i], rows[i]))[:k]
    return [rows[i] for i in order]


def matches(metadata, labels, label=None, below=None, stock=None, brand_in=None):
    keep = np.ones(len(labels), bool)
    for row, values in enumerate(metadata):
        if label is not None and CATEGORIES[labels[row]] != label:
            keep[row] = False
        if below is not None and (values is None or not values["price"] < below):
            keep[row] = False
        if stock is not None and (values is None or values["in_stock"] != stock):
            keep[row] = False
        if brand_in is not None and (values is None or values["brand"] not in brand_in):
            keep[row] = False
    return keep


FILTERS = [  # the filter, the same condition for the brute force
    ("label == 'dress' and price < 50", {"label": "dress", "below": 50}),
    ("price < 12 and in_stock == true", {"below": 12, "stock": True}),  # fewer than k
    ("price < 0", {"below": 0}),  # none
    ("label in ['dress', 'shirt', 'shoe']", {}),  # all
    ("brand in [\"o'hara\", 'zeta'] and not (in_stock == false)", {"brand_in": ("o'hara", "zeta"), "stock": True}),
]


# ---------------------------------------------------------------- hostile inputs: tiny images, raw pixels, one sentence

PIXELS = ["model=pixels", "model.image_size=8", *TINY[2:]]  # raw pixels: no network to build


def write_image(path: Path, seed: int, suffix_format: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=suffix_format)


def write_folder(root: Path, per_class: int = 3) -> None:
    for number, label in enumerate(("cats", "dogs")):
        for i in range(per_class):
            write_image(root / label / f"{i:03d}.png", seed=10 * number + i)


def extract_pixels(root: Path, run_dir: str = "store", *extra: str) -> int:
    """`simsearch extract` of a folder, embedded as raw pixels."""
    return simsearch("extract", "data=folder", f"data.root={root}", "data.batch_size=4", *PIXELS,
                     f"run.dir={run_dir}", *extra)


def one_sentence(capsys) -> str:
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    return error


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def finished_within(seconds: float, function):
    """`function()`'s result (or its exception), failing the test if it is still running after `seconds`:
    a reader blocked on a named pipe must not hang the test suite."""
    import threading

    outcome: dict = {}

    def run():
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
