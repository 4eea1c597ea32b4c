"""Label-free (self-supervised) methods from lightly, each one `@register_loss(..., needs_labels=False, views=2)`:
SimCLR (NT-Xent between two views' projections) and BYOL (a momentum teacher gives the targets).

Each method is a module of the heads it trains beside the embedder (they are dropped after training: the embedder's
own head is what simsearch stores and searches) and its loss between the views. A method with a momentum teacher
also keeps the teacher's copy of those heads; the copy of the embedder is kept by the LightningModule, which moves
both after every step (`follow`). SimCLR uses lightly's NT-Xent, not pytorch-metric-learning's: lightly's gathers
the other ranks' views as negatives under DDP (`gather_distributed`), so 2 processes train as one batch would.
"""

from __future__ import annotations

import copy

import torch
from omegaconf import DictConfig

from simsearch.errors import SimsearchError
from simsearch.training.losses import register_loss
from simsearch.training.views import BYOL_VIEWS, SIMCLR_VIEWS, ViewRecipe


class LabelFreeMethod(torch.nn.Module):
    """The parts of a label-free method beside the embedder; `loss(students, teachers, epoch)` of the views'
    embeddings (a list, one (B, dim) tensor per view); `teachers` is None unless `teacher` is set."""

    teacher = False  # a momentum teacher: the module keeps an exponential moving average of the embedder
    views: tuple[ViewRecipe, ...] = SIMCLR_VIEWS  # lightly's augmentation of the method's views

    def loss(self, students: list[torch.Tensor], teachers: list[torch.Tensor] | None, epoch: int) -> torch.Tensor:
        raise NotImplementedError

    def follow(self, momentum: float) -> None:
        """Move the teacher's heads towards the student's (methods with a teacher)."""


def require_lightly(loss: str) -> None:
    """One sentence, not a traceback, when the ssl extra is missing."""
    try:
        import lightly  # noqa: F401
    except ImportError:
        raise SimsearchError(f"finetune.loss={loss} needs lightly: pip install 'simsearch[ssl]' (or pip install lightly)") from None


def _frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).requires_grad_(False)


class SimCLR(LabelFreeMethod):
    def __init__(self, ft: DictConfig):
        super().__init__()
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        self.projection = SimCLRProjectionHead(ft.dim, ft.hidden_dim, ft.ssl_dim)
        self.criterion = NTXentLoss(temperature=ft.temperature, gather_distributed=True)

    def loss(self, students: list[torch.Tensor], teachers: list[torch.Tensor] | None, epoch: int) -> torch.Tensor:
        return self.criterion(self.projection(students[0]), self.projection(students[1]))


class BYOL(LabelFreeMethod):
    teacher = True
    views = BYOL_VIEWS

    def __init__(self, ft: DictConfig):
        super().__init__()
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

        self.projection = BYOLProjectionHead(ft.dim, ft.hidden_dim, ft.ssl_dim)
        self.prediction = BYOLPredictionHead(ft.ssl_dim, ft.hidden_dim, ft.ssl_dim)
        self.teacher_projection = _frozen_copy(self.projection)
        self.criterion = NegativeCosineSimilarity()

    def loss(self, students: list[torch.Tensor], teachers: list[torch.Tensor] | None, epoch: int) -> torch.Tensor:
        predicted = [self.prediction(self.projection(student)) for student in students]
        with torch.no_grad():
            targets = [self.teacher_projection(teacher) for teacher in teachers]
        return 0.5 * (self.criterion(predicted[0], targets[1]) + self.criterion(predicted[1], targets[0]))

    def follow(self, momentum: float) -> None:
        from lightly.models.utils import update_momentum

        update_momentum(self.projection, self.teacher_projection, momentum)


@register_loss("simclr", needs_labels=False, views=2)
def _simclr(ft: DictConfig) -> tuple[LabelFreeMethod, None]:
    require_lightly(ft.loss)
    return SimCLR(ft), None


@register_loss("byol", needs_labels=False, views=2)
def _byol(ft: DictConfig) -> tuple[LabelFreeMethod, None]:
    require_lightly(ft.loss)
    return BYOL(ft), None


register_loss("ntxent", needs_labels=False, views=2)(_simclr)  # SimCLR's loss by its own name (simsearch's first label-free loss)
