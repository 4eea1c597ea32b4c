"""The LightningModule of fine-tuning: an embedder (backbone, frozen or partly trainable, + projection head) trained
with a registered loss, the modes of its batch norms, its optimizer groups and learning-rate schedule."""

from __future__ import annotations

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
from simsearch.training.losses import LOSSES, active_fraction, build_loss, mean_pairwise_cosine

log = logging.getLogger(__name__)
VALIDATION_K = [10]  # the K of the validation metrics (val/precision@10) that `finetune.monitor` may name


class MetricLearningModule(L.LightningModule):
    """Backbone (frozen or partly trainable) + projection head, trained with a PML loss.

    Batches carry either cached backbone `features` (frozen mode) or uint8 `pixels` (end to end).
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
        self._val_embeddings: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    def train(self, mode: bool = True) -> MetricLearningModule:
        """Frozen stages keep eval-mode batch norm: their statistics must not drift. With finetune.batch_norm=frozen
        (the default) the unfrozen stages' batch norms keep them too: their scale and shift still train."""
        super().train(mode)
        if mode:
            self.embedder.backbone.eval()
            for module in self.trainable_stages:
                module.train()
            if self.ft.batch_norm == "frozen":
                for module in self.embedder.backbone.modules():
                    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def on_train_epoch_start(self) -> None:
        """Lightning (2.2+) leaves every submodule in the mode it finds it, and a new module trains everywhere:
        without this the frozen stages' batch norms would follow the fine-tuning batches."""
        self.train()

    def embed(self, batch: dict[str, Any], view: int | None = None, augmented: bool = False) -> torch.Tensor:
        if "features" in batch:
            features = batch["features"]
            if features.ndim == 3:  # (B, views, D): cached augmented views for NT-Xent
                features = features[:, view or 0]
            return self.embedder.embed_features(features)
        pixels = (augment(batch["pixels"], strong=LOSSES[self.ft.loss].views > 1, crop_scale=self.ft.crop_scale)
                  if augmented else batch["pixels"])
        return self.embedder(pixels)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if LOSSES[self.ft.loss].views > 1:  # two views of each image; a view's only positive is its twin
            first = self.embed(batch, view=0, augmented=True)
            second = self.embed(batch, view=1, augmented=True)
            embeddings = torch.cat([first, second])
            labels = torch.arange(len(first), device=self.device).repeat(2)
            loss, triplets = self.loss_fn(embeddings, labels), None
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
        embeddings, labels = torch.cat(self._val_embeddings).numpy(), torch.cat(self._val_labels).numpy()
        self._val_embeddings, self._val_labels = [], []
        if self.trainer.sanity_checking:
            return
        embeddings, labels = self.all_gather_validation(embeddings, labels)
        metrics = evaluate_embeddings(embeddings, labels, self.classes, VALIDATION_K)
        for name in metric_names(VALIDATION_K):
            shown = name in ("precision@10", "map@r")
            self.log(f"val/{name}", metrics[name], prog_bar=shown, sync_dist=False, rank_zero_only=False)
        # one line per epoch, also without a progress bar or logger (long CPU runs, batch jobs)
        if self.trainer.is_global_zero:
            say(f"epoch {self.current_epoch + 1}/{self.trainer.max_epochs}: val/precision@10 "
                f"{metrics['precision@10']:.4f}, val/map@r {metrics['map@r']:.4f}")

    def all_gather_validation(self, embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Under DDP every rank evaluates the whole validation set (padding duplicates included)."""
        if self.trainer.world_size == 1:
            return embeddings, labels
        gathered_e = self.all_gather(torch.from_numpy(embeddings).to(self.device))
        gathered_l = self.all_gather(torch.from_numpy(labels).to(self.device))
        return gathered_e.reshape(-1, embeddings.shape[1]).cpu().numpy(), gathered_l.reshape(-1).cpu().numpy()

    def configure_optimizers(self) -> Any:
        groups = [{"params": list(self.embedder.head.parameters()), "lr": self.ft.lr}]
        groups += backbone_groups(self.embedder.backbone, self.ft.unfreeze, self.ft.backbone_lr, self.ft.layer_decay)
        optimizer = torch.optim.AdamW(groups, weight_decay=self.ft.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = round(total * self.ft.warmup_epochs / max(1, self.ft.epochs))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["simsearch"] = self.metadata


# ---------------------------------------------------------------- checkpoints


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


