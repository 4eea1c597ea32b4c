"""The LightningModule of fine-tuning: an embedder (backbone, frozen or partly trainable, + projection head) trained
with a registered loss, the modes of its batch norms, its optimizer groups and learning-rate schedule."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig

from simsearch.data.loading import augment
from simsearch.errors import SimsearchError
from simsearch.evaluation import evaluate_embeddings
from simsearch.metrics import metric_names
from simsearch.model import Embedder, stage_groups
from simsearch.runtime import say
from simsearch.training.label_free import LabelFreeMethod
from simsearch.training.losses import active_fraction, build_loss, mean_pairwise_cosine
from simsearch.training.views import make_views

log = logging.getLogger(__name__)
VALIDATION_K = [10]  # the K of the validation metrics (val/precision@10) that `finetune.monitor` may name


class MetricLearningModule(L.LightningModule):
    """Backbone (frozen or partly trainable) + projection head, trained with a registered loss: a supervised one of
    pytorch-metric-learning, or a label-free method (`simsearch.training.label_free`) on two views of each image.

    Batches carry either cached backbone `features` (frozen mode) or uint8 `pixels` (end to end). A method with a
    momentum teacher gets `teacher`: a copy of what trains (the head alone with a frozen backbone, whose cached
    features both share; the whole embedder end to end), moved towards the student after every step.
    """

    def __init__(self, embedder: Embedder, ft: DictConfig, classes: list[str], metadata: dict[str, Any]):
        super().__init__()
        self.embedder = embedder
        self.ft = ft
        self.classes = classes
        self.metadata = metadata
        self.loss_fn, self.miner = build_loss(ft)
        self.trainable_stages = unfrozen_stages(embedder.backbone, ft.unfreeze)
        self.embedder.backbone.requires_grad_(False)
        for module in self.trainable_stages:
            module.requires_grad_(True)
        self.teacher = momentum_teacher(embedder, ft.unfreeze) if self.method is not None and self.method.teacher else None
        self.view_recipes = (tuple(recipe.adjusted(ft.crop_scale, ft.colour, ft.blur) for recipe in self.method.views)
                             if self.method is not None else ())
        self._val_embeddings: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    @property
    def method(self) -> LabelFreeMethod | None:
        """The label-free method, when the loss is one (a module of its own heads)."""
        return self.loss_fn if isinstance(self.loss_fn, LabelFreeMethod) else None

    def train(self, mode: bool = True) -> MetricLearningModule:
        """Frozen stages keep eval-mode batch norm: their statistics must not drift. With finetune.batch_norm=frozen
        (the default) the unfrozen stages' batch norms keep them too: their scale and shift still train.
        The teacher's modules take the modes of the student's of the same name."""
        super().train(mode)
        if mode:
            self.embedder.backbone.eval()
            for module in self.trainable_stages:
                module.train()
            if self.ft.batch_norm == "frozen":
                for module in self.embedder.backbone.modules():
                    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                        module.eval()
        if self.teacher is not None:
            student = dict(self.embedder.named_modules())
            for name, module in self.teacher.named_modules():
                module.training = student[name].training if name in student else mode
        return self

    def on_train_epoch_start(self) -> None:
        """Lightning (2.2+) leaves every submodule in the mode it finds it, and a new module trains everywhere:
        without this the frozen stages' batch norms would follow the fine-tuning batches."""
        self.train()

    def embed(self, batch: dict[str, Any], augmented: bool = False) -> torch.Tensor:
        if "features" in batch:
            features = batch["features"]
            return self.embedder.embed_features(features[:, 0] if features.ndim == 3 else features)
        pixels = augment(batch["pixels"], strong=False, crop_scale=self.ft.crop_scale) if augmented else batch["pixels"]
        return self.embedder(pixels)

    def two_views(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """Two views of every item: two different cached views of its features (drawn per item from
        `finetune.views`), or its pixels augmented twice by the method's recipe, at once for the batch."""
        if "features" in batch:
            features = batch["features"]  # (B, views, D)
            rows, count = torch.arange(len(features), device=features.device), features.shape[1]
            first = torch.randint(count, (len(features),), device=features.device)
            second = (first + torch.randint(1, count, (len(features),), device=features.device)) % count
            return [features[rows, first], features[rows, second]]
        return make_views(batch["pixels"], self.view_recipes)

    def embed_view(self, view: torch.Tensor, network: Embedder) -> torch.Tensor:
        return network.embed_features(view) if view.ndim == 2 else network(view)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.method is not None:  # two views of each image; a view's only positive is its twin
            views = self.two_views(batch)
            students = [self.embed_view(view, self.embedder) for view in views]
            teachers = None
            if self.teacher is not None:
                with torch.no_grad():
                    teachers = [self.embed_view(view, self.teacher) for view in views]
            loss, triplets = self.method.loss(students, teachers, self.current_epoch), None
            embeddings = torch.cat(students)
            labels = torch.arange(len(students[0]), device=self.device).repeat(2)
        else:
            embeddings, labels = self.embed(batch, augmented=True), batch["label"]
            mined = self.miner(embeddings, labels) if self.miner is not None else None
            loss = self.loss_fn(embeddings, labels, mined)
            triplets = mined if mined is not None and len(mined) == 3 else None  # a pair miner gives four tensors
        with torch.no_grad():
            detached = embeddings.detach().float()
            sample = slice(0, 128)  # all triplets of a batch grow as B^3: measure on the first 128
            active = (active_fraction(detached, labels, self.ft.margin, triplets) if triplets is not None
                      else active_fraction(detached[sample], labels[sample], self.ft.margin))
        size = len(labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log("train/active_fraction", active, on_epoch=True, on_step=False, batch_size=size)
        self.log("train/mean_pairwise_cosine", mean_pairwise_cosine(detached), on_epoch=True, on_step=False, batch_size=size)
        self.log("train/embedding_std", detached.std(dim=0).mean(), on_epoch=True, on_step=False, batch_size=size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The teacher follows the student: momentum from `finetune.momentum` to 1 by lightly's cosine schedule."""
        if self.teacher is None:
            return
        from lightly.models.utils import update_momentum
        from lightly.utils.scheduler import cosine_schedule

        total = max(1, int(self.trainer.estimated_stepping_batches))
        momentum = cosine_schedule(min(self.global_step, total), total, self.ft.momentum, 1.0)
        update_momentum(self.embedder.head, self.teacher.head, momentum)
        if self.ft.unfreeze:
            update_momentum(self.embedder.backbone, self.teacher.backbone, momentum)
        self.method.follow(momentum)

    def on_train_epoch_end(self) -> None:
        metrics = self.trainer.callback_metrics
        cosine = float(metrics.get("train/mean_pairwise_cosine", 0.0))
        active = float(metrics.get("train/active_fraction", 1.0))
        if cosine > self.ft.collapse_cosine:
            log.warning("epoch %d: the embeddings are collapsing (mean pairwise cosine %.3f > %.2f): "
                        "lower finetune.lr or raise finetune.temperature/margin", self.current_epoch, cosine,
                        self.ft.collapse_cosine)
        if active == 0.0 and self.ft.loss == "triplet":  # SupCon and NT-Xent still learn with every margin met
            log.warning("epoch %d: no triplet or pair is active: the loss has nothing left to learn from "
                        "(raise finetune.margin, or use finetune.miner=batch_hard)", self.current_epoch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._val_embeddings.append(self.embed(batch).float().cpu())
        self._val_labels.append(batch["label"].cpu())

    def on_validation_epoch_end(self) -> None:
        """RankMe (the effective rank of the held-out items' embeddings: label-free) every epoch; Precision@10 and
        MAP@R where every held-out item has a label (with a label-free loss: for the report, never for selection)."""
        embeddings, labels = torch.cat(self._val_embeddings).numpy(), torch.cat(self._val_labels).numpy()
        self._val_embeddings, self._val_labels = [], []
        if self.trainer.sanity_checking:
            return
        embeddings, labels = self.all_gather_validation(embeddings, labels)
        shown = {"rankme": effective_rank(embeddings)}
        self.log("val/rankme", shown["rankme"], sync_dist=False, rank_zero_only=False)
        if len(labels) and (labels >= 0).all():
            metrics = evaluate_embeddings(embeddings, labels, self.classes, VALIDATION_K)
            for name in metric_names(VALIDATION_K):
                self.log(f"val/{name}", metrics[name], prog_bar=name in ("precision@10", "map@r"), sync_dist=False,
                         rank_zero_only=False)
            shown |= {"precision@10": metrics["precision@10"], "map@r": metrics["map@r"]}
        # one line per epoch, also without a progress bar or logger (long CPU runs, batch jobs)
        if self.trainer.is_global_zero:
            figures = ", ".join(f"val/{name} {value:.4f}" if name != "rankme" else f"val/rankme {value:.1f}"
                                for name, value in shown.items())
            say(f"epoch {self.current_epoch + 1}/{self.trainer.max_epochs}: {figures}")

    def all_gather_validation(self, embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Under DDP every rank evaluates the whole validation set (padding duplicates included)."""
        if self.trainer.world_size == 1:
            return embeddings, labels
        gathered_e = self.all_gather(torch.from_numpy(embeddings).to(self.device))
        gathered_l = self.all_gather(torch.from_numpy(labels).to(self.device))
        return gathered_e.reshape(-1, embeddings.shape[1]).cpu().numpy(), gathered_l.reshape(-1).cpu().numpy()

    def configure_optimizers(self) -> Any:
        head = list(self.embedder.head.parameters())
        if self.method is not None:  # the method's own heads train at the head's rate (the teacher's copies do not)
            head += [p for p in self.method.parameters() if p.requires_grad]
        groups = [{"params": head, "lr": self.ft.lr}]
        groups += backbone_groups(self.embedder.backbone, self.ft.unfreeze, self.ft.backbone_lr, self.ft.layer_decay)
        optimizer = torch.optim.AdamW(groups, weight_decay=self.ft.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = round(total * self.ft.warmup_epochs / max(1, self.ft.epochs))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["simsearch"] = self.metadata


def momentum_teacher(embedder: Embedder, unfreeze: int) -> Embedder:
    """A copy of what trains, that no gradient moves: the head alone with a frozen backbone (the student's cached
    features are the teacher's too), else the whole embedder (end to end: a second forward pass, no backward)."""
    if unfreeze == 0:
        return Embedder(embedder.preprocess, torch.nn.Identity(), copy.deepcopy(embedder.head)).requires_grad_(False)
    return copy.deepcopy(embedder).requires_grad_(False)


def effective_rank(embeddings: np.ndarray) -> float:
    """RankMe (Garrido et al., 2023): exp of the entropy of the normalised singular values; from 1 (collapsed
    onto one direction) to the dimension (every direction used alike). Needs no label."""
    singular = np.linalg.svd(embeddings.astype(np.float64), compute_uv=False)
    shares = singular / singular.sum() + 1e-7
    return float(np.exp(-(shares * np.log(shares)).sum()))


def unfrozen_stages(backbone: torch.nn.Module, unfreeze: int) -> list[torch.nn.Module]:
    """The modules of the backbone's last `unfreeze` stage groups (none when 0)."""
    if unfreeze == 0:
        return []
    groups = stage_groups(backbone)
    if unfreeze > len(groups):
        raise SimsearchError(f"finetune.unfreeze={unfreeze}, but this backbone has {len(groups)} stage groups")
    return [module for group in groups[len(groups) - unfreeze:] for module in group]


def backbone_groups(backbone: torch.nn.Module, unfreeze: int, top_lr: float, decay: float) -> list[dict[str, Any]]:
    """One optimizer group per unfrozen stage group, the top one at `top_lr` and each lower one `decay` times
    the one above it: the lower stages hold the most general features and should move least."""
    if unfreeze == 0:
        return []
    groups = stage_groups(backbone)[-unfreeze:]
    rates = [top_lr * decay ** depth for depth in range(len(groups))][::-1]
    return [{"params": [p for module in group for p in module.parameters() if p.requires_grad], "lr": lr}
            for group, lr in zip(groups, rates)]


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor at `step`: linear from ~0 to 1 over `warmup` steps, then cosine down to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))  # a float: np.float64 would not load weights_only


