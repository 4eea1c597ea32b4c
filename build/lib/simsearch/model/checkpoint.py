"""Fine-tuned checkpoints that rebuild themselves: a typed backbone spec is stored beside the weights.

`checkpoint["simsearch"]` (format 2) holds `backbone` (BackboneSpec.to_dict: name, family, weights,
preprocessing), `seed`, `head` (in_dim, hidden_dim, dim), `unfreeze`, `loss`; `extract`, `search` and
`serve` rebuild the network from the file alone. Format 1 (ResNet-50 only, written before backbones
could be chosen) is read as the equivalent spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from simsearch.errors import SimsearchError
from simsearch.model.backbones import BackboneSpec, Preprocessing
from simsearch.model.embedder import Embedder, Preprocess, ProjectionHead, build_backbone

CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)


def _upgrade(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    """A format-1 record (backbone: "resnet50", preprocessing at the top level) as format 2."""
    if meta.get("backbone") != "resnet50":
        raise SimsearchError(f"{path} holds a {meta.get('backbone')} backbone, which format-1 checkpoints cannot describe")
    preprocessing = Preprocessing(int(meta["image_size"]), tuple(meta["mean"]), tuple(meta["std"]), "bilinear")
    spec = BackboneSpec("resnet50", "torchvision", str(meta["weights"]), preprocessing)
    return {**meta, "format": CHECKPOINT_FORMAT, "backbone": spec.to_dict()}


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A simsearch checkpoint, loaded with weights_only=True (no code runs from the file); metadata as format 2."""
    path = Path(path)
    if not path.is_file():
        raise SimsearchError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt or foreign files raise many types
        raise SimsearchError(f"cannot read checkpoint {path}: {str(error).splitlines()[0]}") from None
    meta = checkpoint.get("simsearch") if isinstance(checkpoint, dict) else None
    if not isinstance(meta, dict) or "format" not in meta:
        raise SimsearchError(f"{path} is not a simsearch fine-tuning checkpoint (written by `simsearch finetune`)")
    if meta["format"] not in READABLE_FORMATS:
        raise SimsearchError(f"{path} has checkpoint format {meta['format']}; this simsearch reads formats "
                             f"{', '.join(map(str, READABLE_FORMATS))}: upgrade simsearch")
    try:
        checkpoint["simsearch"] = _upgrade(meta, path) if meta["format"] == 1 else meta
        BackboneSpec.from_dict(checkpoint["simsearch"]["backbone"])
    except (KeyError, TypeError, ValueError) as error:
        raise SimsearchError(f"{path} has an incomplete simsearch record (missing or bad {error})") from None
    return checkpoint


def checkpoint_metadata(path: Path) -> dict[str, Any]:
    return read_checkpoint(path)["simsearch"]


def checkpoint_backbone(path: Path) -> BackboneSpec:
    return BackboneSpec.from_dict(checkpoint_metadata(path)["backbone"])


def finetune_record(spec: BackboneSpec, seed: int, width: int, hidden_dim: int, dim: int, unfreeze: int,
                    loss: str, **extra: Any) -> dict[str, Any]:
    """What a fine-tuning checkpoint records about its network (and `extra`: data, config)."""
    return {"format": CHECKPOINT_FORMAT, "backbone": spec.to_dict(), "seed": seed,
            "head": {"in_dim": width, "hidden_dim": hidden_dim, "dim": dim}, "unfreeze": unfreeze, "loss": loss, **extra}


def load_finetuned_embedder(path: Path) -> Embedder:
    """Backbone + head exactly as trained, from a checkpoint of `simsearch finetune`."""
    checkpoint = read_checkpoint(Path(path))
    meta = checkpoint["simsearch"]
    spec = BackboneSpec.from_dict(meta["backbone"])
    architecture = BackboneSpec(spec.name, spec.family, "random", spec.preprocessing)  # weights come from the file
    embedder = Embedder(Preprocess.from_spec(spec.preprocessing), build_backbone(architecture, meta["seed"]).network,
                        ProjectionHead(**meta["head"]))
    state = {k.removeprefix("embedder."): v for k, v in checkpoint["state_dict"].items() if k.startswith("embedder.")}
    try:
        embedder.load_state_dict(state)
    except RuntimeError as error:
        raise SimsearchError(f"checkpoint {path} does not match the network it describes: {str(error).splitlines()[0]}") from None
    return embedder.eval()
