"""A model config made whole, and the frozen network it names: the one place where a config (or a
fine-tuned checkpoint) becomes an `Embedder`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from simsearch.config import ModelConfig
from simsearch.errors import SimsearchError
from simsearch.model.backbones import BackboneSpec, Preprocessing, check_name, default_preprocessing
from simsearch.model.checkpoint import checkpoint_backbone, load_finetuned_embedder
from simsearch.model.embedder import Embedder, Preprocess, build_backbone

log = logging.getLogger(__name__)



def resolve_model_config(model: DictConfig) -> DictConfig:
    """`model` with nothing left to the library: a checkpoint's recorded backbone, or the backbone's own
    preprocessing (size, mean, std, interpolation) wherever the config leaves it null."""
    if model.checkpoint:
        spec = checkpoint_backbone(Path(model.checkpoint))
        resolved = OmegaConf.merge(model, {"name": spec.name, "weights": spec.weights,
                                           **spec.to_dict()["preprocessing"],
                                           "checkpoint": str(Path(model.checkpoint).resolve())})
        if model.image_size is not None and resolved.image_size != model.image_size:
            log.info("model.image_size=%d from the checkpoint (trained at that size)", resolved.image_size)
        return resolved
    defaults = default_preprocessing(model.name)
    return OmegaConf.merge(model, {
        "image_size": model.image_size if model.image_size is not None else defaults.image_size,
        "mean": list(model.mean) if model.mean is not None else list(defaults.mean),
        "std": list(model.std) if model.std is not None else list(defaults.std),
        "interpolation": model.interpolation or defaults.interpolation,
    })


def backbone_spec(model: DictConfig | dict[str, Any]) -> BackboneSpec:
    """The typed spec of a model config, e.g. {"name": "resnet18", "weights": "random"} (null keys resolved)."""
    if isinstance(model, dict):
        model = OmegaConf.merge(OmegaConf.structured(ModelConfig), model)
    model = resolve_model_config(model) if _unresolved(model) else model
    family, _ = check_name(model.name)
    for key in ("mean", "std"):
        if len(model[key]) != 3 or (key == "std" and min(model[key]) <= 0):
            kind = "positive numbers" if key == "std" else "numbers"
            raise SimsearchError(f"model.{key} must be three {kind} (R, G, B), not {list(model[key])}")
    if int(model.image_size) < 1:
        raise SimsearchError(f"model.image_size must be positive, not {model.image_size}")
    preprocessing = Preprocessing(int(model.image_size), tuple(model.mean), tuple(model.std),
                                  str(model.get("interpolation") or "bilinear"))
    return BackboneSpec(str(model.name), family, str(model.weights), preprocessing)


def _unresolved(model: DictConfig) -> bool:
    return any(model.get(key) is None for key in ("image_size", "mean", "std"))


def build_embedder(model: DictConfig, seed: int) -> Embedder:
    """The frozen network a model config describes (a fine-tuned checkpoint when one is named)."""
    if model.checkpoint:
        return load_finetuned_embedder(Path(model.checkpoint))
    spec = backbone_spec(model)
    return Embedder(Preprocess.from_spec(spec.preprocessing), build_backbone(spec, seed).network)
