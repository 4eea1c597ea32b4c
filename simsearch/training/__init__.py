"""Fine-tuning as a library: the loss registry (`losses`), the LightningModule and its schedule (`module`), what it
trains on (`data`, `features`) and one run (`fit`). `simsearch finetune` and `simsearch compare` are commands over it."""

from simsearch.training.features import base_model_config, extract_or_reuse, project_store, store_matches
from simsearch.training.fit import fit
from simsearch.training.label_free import LabelFreeMethod
from simsearch.training.losses import LOSSES, LossKind, build_loss, register_loss
from simsearch.training.module import MetricLearningModule, backbone_groups, unfrozen_stages, warmup_cosine

__all__ = ["LOSSES", "LabelFreeMethod", "LossKind", "MetricLearningModule", "backbone_groups", "base_model_config", "build_loss",
           "extract_or_reuse", "fit", "project_store", "register_loss", "store_matches", "unfrozen_stages", "warmup_cosine"]
