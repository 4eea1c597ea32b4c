"""`simsearch finetune`: a projection head (and optionally the backbone's last stages) trained with a registered
loss on the train split, the checkpoint selected on its held-out part (never the test split): `simsearch.training`.

Two modes share one LightningModule and `Trainer.fit`:
- `finetune.unfreeze=0`: the backbone stays frozen, its features of the train split are extracted
  once into a store (the cache) and the head trains on them: minutes on a CPU.
- `finetune.unfreeze=N`: the backbone's last N stage groups train too (ResNet layers, EfficientNet
  stages, ViT blocks: `simsearch.model.stage_groups`), on augmented images.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from simsearch.training import LOSSES, register_loss
from simsearch.training import fit as train

__all__ = ["LOSSES", "finetune", "register_loss"]  # register_loss here too: the README's examples import it from here


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Train on the train split; keep the checkpoint that model selection picks (`finetune.json` says which)."""
    return train(cfg)
