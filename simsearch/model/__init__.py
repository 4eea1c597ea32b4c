"""The model stage: backbone registry, weights, the embedding network, and fine-tuned checkpoints.

`build_embedder(cfg.model, seed)` is the entry point: any torchvision name or `timm/<name>`, with
`imagenet`, `random` or a state-dict path as weights, or a fine-tuned checkpoint that describes itself.
"""

from simsearch.model.backbones import (
    FAMILIES,
    Backbone,
    BackboneSpec,
    Preprocessing,
    default_preprocessing,
    register_family,
    stage_groups,
)
from simsearch.model.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_backbone,
    checkpoint_metadata,
    finetune_record,
    load_finetuned_embedder,
    read_checkpoint,
)
from simsearch.model.embedder import (
    Embedder,
    EmbeddingModule,
    Preprocess,
    ProjectionHead,
    backbone_spec,
    build_backbone,
    build_embedder,
    resolve_model_config,
)
from simsearch.model.weights import load_state_dict_file

__all__ = [
    "CHECKPOINT_FORMAT", "FAMILIES", "Backbone", "BackboneSpec", "Embedder", "EmbeddingModule", "Preprocess",
    "Preprocessing", "ProjectionHead", "backbone_spec", "build_backbone", "build_embedder",
    "checkpoint_backbone", "checkpoint_metadata", "default_preprocessing", "finetune_record", "load_finetuned_embedder",
    "load_state_dict_file", "read_checkpoint", "register_family", "resolve_model_config", "stage_groups",
]
