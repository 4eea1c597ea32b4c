"""One model identity: which settings make a vector what it is.

Incremental extraction (the fingerprint), eval's gallery check, `duplicates.against`, the fine-tuning
feature cache and the query encoder all ask this module, so "the same model" means one thing everywhere,
and every refusal names the setting that differs.

A store's manifest records its identity under "embedder": the resolved model (family's name, weights,
preprocessing, checkpoint), the seed where it matters (random weights), and how the vectors were computed
(precision and inference path). Older manifests without it are read from their "model" section.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from simsearch.errors import SimsearchError

# What decides a vector beyond the seed: the network, its weights and how its inputs are prepared.
MODEL_SETTINGS = ("name", "weights", "checkpoint", "image_size", "mean", "std", "interpolation")
# How the same network computed it: vectors of one store never mix two of these.
COMPUTE_SETTINGS = ("precision", "inference")


def file_identity(path: str | None) -> list[Any] | None:
    """A weights or checkpoint file's resolved path, size and mtime: retraining into the same path is another model."""
    if not path or not Path(path).expanduser().is_file():
        return None
    stat = Path(path).expanduser().stat()
    return [str(Path(path).expanduser().resolve()), stat.st_size, stat.st_mtime_ns]


def embedder_identity(model: DictConfig | dict[str, Any], seed: int, precision: str | None = None,
                      inference: str | None = None) -> dict[str, Any]:
    """The identity of a resolved model config (or a manifest's model section) run with `seed`."""
    model = OmegaConf.to_container(model, resolve=True) if isinstance(model, DictConfig) else dict(model)
    identity = {key: model.get(key) for key in MODEL_SETTINGS}
    for key in ("mean", "std"):
        identity[key] = [float(v) for v in identity[key]] if identity[key] is not None else None
    seeded = identity["weights"] == "random" and not identity["checkpoint"]  # the seed makes random weights
    identity["seed"] = int(seed) if seeded else None
    identity.update(precision=precision, inference=inference)
    return identity


def stored_identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """The identity a store's manifest records (read from its model section when it predates the record)."""
    if isinstance(manifest.get("embedder"), dict):
        return manifest["embedder"]
    model = manifest.get("model") or {}
    return embedder_identity(model, int(model.get("seed") or 0))


def first_difference(a: dict[str, Any], b: dict[str, Any], settings: tuple[str, ...]) -> str | None:
    for key in settings:
        if a.get(key) != b.get(key):
            return key
    return None


def check_same_model(a: dict[str, Any], b: dict[str, Any], a_name: str, b_name: str) -> None:
    """Refuse, in one sentence naming the setting, two identities whose vectors cannot be compared. The
    inference path is not compared: a frozen network gives its eager vectors (checked when it is frozen)."""
    key = first_difference(a, b, (*MODEL_SETTINGS, "seed", "precision"))
    if key is not None:
        shown = "run.seed (random weights)" if key == "seed" else f"model.{key}" if key in MODEL_SETTINGS \
            else f"the {key} ({'trainer.precision' if key == 'precision' else 'model.inference'})"
        raise SimsearchError(f"{a_name} and {b_name} were embedded differently ({shown}: {a.get(key)!r} vs "
                             f"{b.get(key)!r}): their vectors cannot be compared; extract both with the same settings")


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:20]


def run_fingerprint(cfg: DictConfig, identity: dict[str, Any], augment_seed: int | None, kind: Any) -> dict[str, str]:
    """What makes two vectors of the same key interchangeable: the embedder (identity, files, store dtype,
    augmentation, decoder) and the source the keys are relative to (dataset or folder root). `kind`: the
    dataset's entry in `simsearch.data.DATASETS`, which says what else decides its items (`kind.source`)
    and whether its decoder matters (`kind.decode_matters`)."""
    embedder = {**identity, "dtype": cfg.store.dtype, "augment_seed": augment_seed,
                "weights_file": file_identity(cfg.model.weights), "checkpoint_file": file_identity(cfg.model.checkpoint),
                "decode": cfg.data.decode if kind.decode_matters else None}
    data = cfg.data
    root = str(Path(data.root).expanduser().resolve()) if data.root else None
    source = {"name": data.name, "root": root, "split": data.split, **kind.source(data, int(cfg.run.seed))}
    return {"embedder": digest(embedder), "source": digest(source)}
