"""The model stage: backbone families (a registry), weights, the embedding network, fine-tuned checkpoints,
fused CPU inference and the query encoder.

`build_embedder(cfg.model, seed)` is the entry point: any torchvision name, `timm/<name>`, `pixels`, or a
registered family's `<family>/<name>`, with `imagenet`, `random` or a state-dict path as weights, or a
fine-tuned checkpoint that describes itself.
"""

from simsearch.model.backbones import (
    FAMILIES,
    Backbone,
    BackboneSpec,
    Family,
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
from simsearch.model.embedder import Embedder, Preprocess, ProjectionHead, build_backbone
from simsearch.model.factory import backbone_spec, build_embedder, resolve_model_config
from simsearch.model.weights import load_state_dict_file

__all__ = [
    "CHECKPOINT_FORMAT", "FAMILIES", "Backbone", "BackboneSpec", "Embedder", "Family", "Preprocess",
    "Preprocessing", "ProjectionHead", "backbone_spec", "build_backbone", "build_embedder",
    "checkpoint_backbone", "checkpoint_metadata", "default_preprocessing", "finetune_record", "load_finetuned_embedder",
    "load_state_dict_file", "read_checkpoint", "register_family", "resolve_model_config", "stage_groups",
]
