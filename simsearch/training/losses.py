"""The loss registry: one `@register_loss` entry per loss, each saying whether it reads labels and how many
augmented views of an image it needs per step. The supervised losses come from pytorch-metric-learning, the
label-free ones from lightly (`simsearch.training.label_free`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig

from simsearch.index import faiss_left_as_it_was
from simsearch.registry import Registry


@dataclass(frozen=True)
class LossKind:
    """A loss of the registry: how to build it (with its miner), whether it needs labels, how many views."""

    build: Callable[[DictConfig], tuple[Any, Any | None]]
    needs_labels: bool
    views: int  # augmented views of each image per step: 1 (labels give the positives) or 2 (a view's positive is its twin)


# a new loss is one `@register_loss` entry; `finetune.loss` names one
LOSSES: Registry[LossKind] = Registry("loss", "finetune.loss")


def register_loss(name: str, needs_labels: bool, views: int = 1) -> Callable:
    """`@register_loss("multisimilarity", needs_labels=True)` on `build(finetune_cfg) -> (loss, miner or None)`:
    `finetune.loss=multisimilarity` then trains with it."""
    return LOSSES.decorator(name, lambda build: LossKind(build, needs_labels, views))


@register_loss("triplet", needs_labels=True)
def _triplet(ft: DictConfig) -> tuple[Any, Any]:
    from pytorch_metric_learning import distances, losses, miners

    cosine = distances.CosineSimilarity()
    loss = losses.TripletMarginLoss(margin=ft.margin, distance=cosine)
    if ft.miner == "batch_hard":
        return loss, miners.BatchHardMiner(distance=cosine)
    return loss, miners.TripletMarginMiner(margin=ft.margin, type_of_triplets="semihard", distance=cosine)


@register_loss("supcon", needs_labels=True)
def _supcon(ft: DictConfig) -> tuple[Any, None]:
    from pytorch_metric_learning import losses

    return losses.SupConLoss(temperature=ft.temperature), None


def build_loss(ft: DictConfig) -> tuple[Any, Any | None]:
    """(loss, miner) of `finetune.loss`; pytorch-metric-learning leaves FAISS as it found it."""
    with faiss_left_as_it_was():
        return LOSSES[ft.loss].build(ft)


def active_fraction(embeddings: torch.Tensor, labels: torch.Tensor, margin: float, triplets: Any = None) -> torch.Tensor:
    """Fraction of (anchor, positive, negative) triplets that violate the margin: what the loss learns from."""
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    anchors, positives, negatives = triplets if triplets is not None else lmu.get_all_triplets_indices(labels)
    if len(anchors) == 0:
        return embeddings.new_zeros(())
    similarity = embeddings @ embeddings.T
    violating = similarity[anchors, negatives] > similarity[anchors, positives] - margin
    return violating.float().mean()


def mean_pairwise_cosine(embeddings: torch.Tensor) -> torch.Tensor:
    n = len(embeddings)
    similarity = embeddings @ embeddings.T
    return (similarity.sum() - similarity.diagonal().sum()) / max(1, n * (n - 1))
