"""Shared fixtures: the real config, shrunk (tiny images, random weights, no logger, tmp outputs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

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


def read_json(path: Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test runs in its own folder, with torchvision's cache there (never the user's)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path.parent / f"{tmp_path.name}-cache"))  # the MAC key of .verified.json
    monkeypatch.setenv("WANDB_SILENT", "true")
    yield
    forget_torchscript()


def forget_torchscript() -> None:
    """TorchScript keeps every traced module's code, its frozen weights included, for the life of the process
    (~100 MB per frozen ResNet-50); a suite that extracts hundreds of times in one process would hold them
    all. Between tests nothing frozen is alive, so the registry is emptied (a user's process extracts once)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    import gc

    gc.collect()
    torch.jit._state._python_cu.drop_all_functions()
    torch.jit._recursive.concrete_type_store.type_store.clear()
    torch.jit._state._clear_class_state()
