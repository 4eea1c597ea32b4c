"""Fine-tuning: a projection head (and optionally the backbone's last stages) trained with a metric-learning
loss from pytorch-metric-learning, selected on a held-out part of the train split (never the test split).

Two modes share one LightningModule and `Trainer.fit`:
- `finetune.unfreeze=0`: the backbone stays frozen, its features of the train split are extracted
  once into a store (the cache) and the head trains on them: minutes on a CPU.
- `finetune.unfreeze=N`: the backbone's last N stage groups train too (ResNet layers, EfficientNet
  stages, ViT blocks: `simsearch.model.stage_groups`), on augmented images: a GPU job.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from simsearch.config import save_config
from simsearch.data import ImageCollection, Resize, build_collection
from simsearch.data.loading import augment, collate
from simsearch.errors import SimsearchError
from simsearch.evaluation import evaluate_embeddings
from simsearch.extraction import extract_store as extract
from simsearch.files import write_json_atomically
from simsearch.identity import MODEL_SETTINGS, embedder_identity, first_difference, stored_identity
from simsearch.index import faiss_left_as_it_was
from simsearch.metrics import metric_names
from simsearch.model import (
    Embedder,
    Preprocess,
    ProjectionHead,
    backbone_spec,
    build_backbone,
    checkpoint_metadata,
    finetune_record,
    load_finetuned_embedder,
    read_checkpoint,
    resolve_model_config,
    stage_groups,
)
from simsearch.runtime import build_trainer, say
from simsearch.store import Store, create_store
from simsearch.tracking import finish, start_run

log = logging.getLogger(__name__)
VALIDATION_K = [10]  # the K of the validation metrics (val/precision@10) that `finetune.monitor` may name


# ---------------------------------------------------------------- checks, made before any training


def check_finetune_config(ft: DictConfig, labels: np.ndarray) -> None:
    """Every mistake that would otherwise surface mid-run, as one sentence, before any extraction."""
    if ft.loss not in LOSSES:
        raise SimsearchError(f"finetune.loss must be {', '.join(LOSSES)}, not '{ft.loss}'")
    if ft.loss == "triplet" and ft.miner not in ("batch_hard", "semi_hard"):
        raise SimsearchError(f"finetune.miner must be batch_hard or semi_hard, not '{ft.miner}'")
    if ft.unfreeze < 0:
        raise SimsearchError(f"finetune.unfreeze must be 0 or a number of stages, not {ft.unfreeze}")
    if ft.batch_norm not in ("frozen", "train"):
        raise SimsearchError(f"finetune.batch_norm must be frozen or train, not '{ft.batch_norm}'")
    if not 0 < ft.layer_decay <= 1:
        raise SimsearchError(f"finetune.layer_decay must be in (0, 1], not {ft.layer_decay}")
    if ft.crop_scale is not None and not 0 < ft.crop_scale <= 1:
        raise SimsearchError(f"finetune.crop_scale={ft.crop_scale} must be a share of the image's area in (0, 1]: "
                             "e.g. 0.6, or 1 for no crop")
    if not 0 <= ft.warmup_epochs <= ft.epochs:
        raise SimsearchError(f"finetune.warmup_epochs must be between 0 and finetune.epochs={ft.epochs}, not {ft.warmup_epochs}")
    if not 0 < ft.val_fraction < 1:
        raise SimsearchError(f"finetune.val_fraction must be between 0 and 1, not {ft.val_fraction}")
    monitors = [f"val/{name}" for name in metric_names(VALIDATION_K)]  # the metrics table, at K = 10
    if ft.monitor not in monitors:
        raise SimsearchError(f"finetune.monitor must be one of {', '.join(monitors)}, not '{ft.monitor}'")
    if LOSSES[ft.loss].needs_labels:
        classes = len(np.unique(labels[labels >= 0]))
        if classes == 0:
            raise SimsearchError(
                f"finetune.loss={ft.loss} needs labels, and the train split has none: "
                "use finetune.loss=ntxent (no labels), or a labelled collection"
            )
        if ft.batch_size % ft.m_per_class:
            raise SimsearchError(f"finetune.batch_size={ft.batch_size} must be a multiple of finetune.m_per_class={ft.m_per_class}")
        wanted = ft.batch_size // ft.m_per_class
        if wanted > classes:
            raise SimsearchError(
                f"finetune.batch_size={ft.batch_size} with finetune.m_per_class={ft.m_per_class} asks for {wanted} classes "
                f"per batch, but the train split has {classes}: lower the batch size or raise m_per_class"
            )


def split_rows(count: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of the train split's rows into (train, validation)."""
    order = np.random.default_rng(seed).permutation(count)
    held_out = max(1, int(round(count * val_fraction)))
    return np.sort(order[held_out:]), np.sort(order[:held_out])


# ---------------------------------------------------------------- losses


@dataclass(frozen=True)
class LossKind:
    """A loss of the registry: how to build it (with its miner), whether it needs labels, how many views."""

    build: Callable[[DictConfig], tuple[Any, Any | None]]
    needs_labels: bool
    views: int  # augmented views of each image per step: 1 (labels give the positives) or 2 (a view's positive is its twin)


# pytorch-metric-learning losses, all on cosine similarity; a new loss is one `@register_loss` entry
LOSSES: dict[str, LossKind] = {}


def register_loss(name: str, needs_labels: bool, views: int = 1) -> Callable:
    """`@register_loss("multisimilarity", needs_labels=True)` on `build(finetune_cfg) -> (loss, miner or None)`:
    `finetune.loss=multisimilarity` then trains with it."""

    def register(build: Callable[[DictConfig], tuple[Any, Any | None]]) -> Callable:
        LOSSES[name] = LossKind(build, needs_labels, views)
        return build

    return register


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


@register_loss("ntxent", needs_labels=False, views=2)
def _ntxent(ft: DictConfig) -> tuple[Any, None]:
    from pytorch_metric_learning import losses

    return losses.NTXentLoss(temperature=ft.temperature), None


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


# ---------------------------------------------------------------- data


class CachedFeatures(Dataset):
    """Rows of the cached backbone features: (D,) per item, or (views, D) for NT-Xent."""

    def __init__(self, features: torch.Tensor, labels: np.ndarray, rows: np.ndarray):
        self.features, self.labels, self.rows = features, torch.from_numpy(labels), torch.from_numpy(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        row = self.rows[position]
        return {"features": self.features[row], "label": self.labels[row]}


class LabelledImages(Dataset):
    """Items of an image collection (by row) with their labels, for end-to-end training."""

    def __init__(self, collection: ImageCollection, rows: np.ndarray):
        self.collection, self.rows = collection, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        sample = self.collection[int(self.rows[position])]
        return {**sample, "label": int(self.collection.labels[int(self.rows[position])])}


def collate_labelled(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = collate(samples)
    batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return batch


# ---------------------------------------------------------------- the module


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


def load_trained_head(head: ProjectionHead, path: str | Path, spec: Any) -> None:
    """Start from the head of a head-only checkpoint (linear probe, then fine-tune: the backbone's features are
    not pulled about by a random head); refused unless it was trained on the same network (any resolution)
    with the same head sizes."""
    checkpoint = read_checkpoint(Path(path))
    meta = checkpoint["simsearch"]
    network = ("name", "family", "weights")  # another resolution is allowed: the head maps the same network's features
    if any(meta["backbone"][key] != spec.to_dict()[key] for key in network):
        raise SimsearchError(f"finetune.init_head={path} was trained on another backbone "
                             f"({meta['backbone']['name']}, {meta['backbone']['weights']} weights): use a head of this one")
    state = {k.removeprefix("embedder.head."): v for k, v in checkpoint["state_dict"].items()
             if k.startswith("embedder.head.")}
    try:
        head.load_state_dict(state)
    except RuntimeError:
        raise SimsearchError(f"finetune.init_head={path} has a head of sizes {meta['head']}: set finetune.hidden_dim "
                             "and finetune.dim to match it") from None


def _compatible(meta: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    keys = ("backbone", "head", "unfreeze", "loss")
    return [f"{k}: {meta.get(k)} != {wanted.get(k)}" for k in keys if meta.get(k) != wanted.get(k)]


# ---------------------------------------------------------------- the stage


def store_matches(store: Store, cfg: DictConfig) -> bool:
    """Whether an existing store was extracted from the same data with the same base model."""
    data = store.manifest.get("data", {})
    root = str(Path(cfg.data.root).expanduser().resolve()) if cfg.data.root else None
    same_data = all(data.get(k) == cfg.data[k] for k in ("name", "split", "limit", "num_items", "num_classes",
                                                          "native_size_px", "labels")) and data.get("root") == root
    wanted = embedder_identity(resolve_model_config(cfg.model), cfg.run.seed)
    stored = stored_identity(store.manifest)
    differs = first_difference(stored, wanted, (*MODEL_SETTINGS, "seed"))
    if same_data and differs:
        log.info("the cached features in %s are not reused: model.%s differs", store.dir, differs)
    return same_data and not differs and store.manifest.get("dtype") == "float32"


def extract_or_reuse(cfg: DictConfig, augment_seed: int | None = None) -> Store:
    """The store at cfg.run.dir if it matches cfg, else a new extraction.

    Under DDP every rank decides the same: from the same files and config, and only a rank that found no
    matching store changes them (removing the manifest), which makes any other rank find none either. The
    extraction is written by global rank 0; every rank opens it after the broadcast of its manifest.
    """
    try:
        store = Store.open(cfg.run.dir)
        if store_matches(store, cfg):
            log.info("reusing the features in %s", cfg.run.dir)
            return store
    except SimsearchError:
        pass
    extract(cfg, augment_seed=augment_seed)
    return Store.open(cfg.run.dir)


def cached_features(cfg: DictConfig) -> tuple[torch.Tensor, Store]:
    """Frozen mode: backbone features of the train split, (N, D) or (N, views, D) for NT-Xent."""
    cache_dir = Path(cfg.run.dir) / "train-features"
    base_cfg = OmegaConf.merge(cfg, {"run": {"dir": str(cache_dir)}, "store": {"dtype": "float32"},
                                     "model": {"checkpoint": None}, "logger": {"wandb": {"enabled": False}}})
    store = extract_or_reuse(base_cfg)
    if LOSSES[cfg.finetune.loss].views == 1:
        return torch.from_numpy(store.vectors()), store
    views = []
    for view in range(max(2, cfg.finetune.views)):
        view_cfg = OmegaConf.merge(base_cfg, {"run": {"dir": str(cache_dir / f"view{view}")}})
        view_store = extract_or_reuse(view_cfg, augment_seed=view + 1)
        if view_store.items != store.items:
            raise SimsearchError(f"cached view {view_cfg.run.dir} does not hold the same items as {cache_dir}: delete it")
        views.append(torch.from_numpy(view_store.vectors()))
    return torch.stack(views, dim=1), store


def loaders(cfg: DictConfig, labels: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray,
            features: torch.Tensor | None, collection: ImageCollection | None) -> tuple[DataLoader, DataLoader]:
    with faiss_left_as_it_was():
        from pytorch_metric_learning.samplers import MPerClassSampler

    ft = cfg.finetune
    if features is not None:
        train_set, val_set, gather = CachedFeatures(features, labels, train_rows), CachedFeatures(features, labels, val_rows), None
    else:
        train_set, val_set, gather = LabelledImages(collection, train_rows), LabelledImages(collection, val_rows), collate_labelled
    if LOSSES[ft.loss].needs_labels:
        sampler = MPerClassSampler(labels[train_rows], ft.m_per_class, ft.batch_size, length_before_new_iter=len(train_rows))
        train = DataLoader(train_set, batch_size=ft.batch_size, sampler=sampler, drop_last=True, collate_fn=gather,
                           num_workers=cfg.data.num_workers if features is None else 0)
    else:
        train = DataLoader(train_set, batch_size=ft.batch_size, shuffle=True, drop_last=True, collate_fn=gather,
                           num_workers=cfg.data.num_workers if features is None else 0)
    val = DataLoader(val_set, batch_size=max(ft.batch_size, 512), collate_fn=gather,
                     num_workers=cfg.data.num_workers if features is None else 0)
    if len(train) == 0:
        raise SimsearchError(f"the train part ({len(train_rows)} items) is smaller than one batch of {ft.batch_size}")
    return train, val


def finetune(cfg: DictConfig) -> dict[str, Any]:
    """Train a head (and optionally stages) on the train split; keep the best checkpoint by validation."""
    ft = cfg.finetune
    cfg = OmegaConf.merge(cfg, {"data": {"split": "train"}, "model": {"checkpoint": None}})
    cfg = OmegaConf.merge(cfg, {"model": resolve_model_config(cfg.model)})
    resize = Resize(cfg.model.image_size, cfg.model.interpolation)
    collection = build_collection(cfg.data, resize, cfg.run.seed)  # cheap: no image is decoded
    check_finetune_config(ft, collection.labels)
    spec = backbone_spec(cfg.model)
    backbone = build_backbone(spec, cfg.run.seed)  # before any extraction: weights and stage groups are checked
    unfrozen_stages(backbone.network, ft.unfreeze)
    if ft.unfreeze == 0:
        features, store = cached_features(cfg)
        labels, classes, collection = store.labels, store.classes, None
    else:
        features, labels, classes = None, collection.labels, collection.classes
    train_rows, val_rows = split_rows(len(labels), ft.val_fraction, cfg.run.seed)
    train_rows = train_rows[labels[train_rows] >= 0] if LOSSES[ft.loss].needs_labels else train_rows
    if len(val_rows) < 11:
        raise SimsearchError(f"finetune.val_fraction={ft.val_fraction} holds out {len(val_rows)} items; validation "
                             "Precision@10 needs at least 11: raise it, or use more data")
    metadata = finetune_record(spec, cfg.run.seed, backbone.width, ft.hidden_dim, ft.dim, ft.unfreeze, ft.loss,
                               train_data={"name": cfg.data.name, "split": "train", "rows": len(train_rows),
                                           "validation_rows": len(val_rows)},
                               config=OmegaConf.to_container(cfg, resolve=True))
    checkpoint_dir = Path(ft.checkpoint_dir) / ft.name
    last = checkpoint_dir / "last.ckpt"
    resume_from = last if ft.resume and last.is_file() else None
    if resume_from is not None:
        problems = _compatible(checkpoint_metadata(last), metadata)
        if problems:
            raise SimsearchError(f"{last} was trained differently ({'; '.join(problems)}): "
                                 "use finetune.resume=false or another finetune.name")
        log.info("resuming from %s", last)
    torch.manual_seed(cfg.run.seed)
    head = ProjectionHead(backbone.width, ft.hidden_dim, ft.dim)
    if ft.init_head and resume_from is None:
        load_trained_head(head, ft.init_head, spec)
    embedder = Embedder(Preprocess.from_spec(spec.preprocessing), backbone.network, head)
    if ft.unfreeze and cfg.model.channels_last:  # the memory layout extraction uses (model.channels_last)
        embedder.use_channels_last()
    module = MetricLearningModule(embedder, ft, classes, metadata)
    train_loader, val_loader = loaders(cfg, labels, train_rows, val_rows, features, collection)
    best = ModelCheckpoint(dirpath=checkpoint_dir, filename="best-epoch{epoch:03d}-map_r{val/map@r:.4f}",
                           auto_insert_metric_name=False, monitor=ft.monitor, mode="max", save_top_k=1)
    # every epoch, improved or not: an interrupted run resumes where it stopped
    latest = ModelCheckpoint(dirpath=checkpoint_dir, filename="last", monitor=None, save_top_k=1,
                             enable_version_counter=False)
    stop = EarlyStopping(monitor=ft.monitor, mode="max", patience=ft.patience)
    run = start_run(cfg, "finetune", name=f"finetune-{ft.name}")
    # at most once per epoch: Lightning warns of a logging interval longer than an epoch
    extra: dict[str, Any] = {"max_epochs": ft.epochs, "enable_checkpointing": True,
                             "log_every_n_steps": max(1, min(10, len(train_loader))),
                             "num_sanity_val_steps": 0}
    if run is not None:
        from lightning.pytorch.loggers import WandbLogger

        extra["logger"] = WandbLogger(experiment=run)
    trainer = build_trainer(cfg, [best, latest, stop], **extra)
    trainer.fit(module, train_loader, val_loader, ckpt_path=resume_from, weights_only=True)
    finish(run)
    if not trainer.is_global_zero:
        return {}
    summary = {"best_checkpoint": best.best_model_path, "monitor": ft.monitor,
               "best_score": float(best.best_model_score) if best.best_model_score is not None else None,
               "epochs_run": trainer.current_epoch, "last_checkpoint": str(last),
               "train_rows": len(train_rows), "validation_rows": len(val_rows)}
    write_json_atomically(checkpoint_dir / "finetune.json", {**summary, "metadata": metadata})
    print(f"best checkpoint: {summary['best_checkpoint']}  ({ft.monitor} = {summary['best_score']:.4f} on "
          f"{len(val_rows)} held-out train items)")
    return summary


def project_store(baseline: Store, checkpoint: Path, out_dir: Path, cfg: DictConfig) -> Store:
    """Frozen-backbone checkpoints: the fine-tuned store is the head applied to the baseline's features.

    Equal (to float rounding) to `extract model.checkpoint=...`, without running the backbone again.
    """
    embedder = load_finetuned_embedder(checkpoint)
    with torch.inference_mode():
        embeddings = np.concatenate([
            embedder.embed_features(torch.from_numpy(baseline.vectors(slice(start, start + 8192)))).numpy()
            for start in range(0, len(baseline), 8192)
        ])
    manifest = baseline.manifest
    description = {key: manifest[key] for key in ("data", "dataset", "split", "weights", "image_size", "skipped")}
    description["model"] = {**manifest["model"], "checkpoint": str(checkpoint.resolve())}
    description["projected_from"] = str(baseline.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    return create_store(out_dir, embeddings.astype(np.float32), baseline.labels, baseline.items, description)


def base_model_config(cfg: DictConfig, checkpoint: Path) -> DictConfig:
    """cfg with the model a checkpoint started from (its backbone, weights, seed, preprocessing): the fair baseline."""
    meta = checkpoint_metadata(checkpoint)
    spec = meta["backbone"]
    return OmegaConf.merge(cfg, {"run": {"seed": meta["seed"]}, "model": {
        "name": spec["name"], "weights": spec["weights"], **spec["preprocessing"], "checkpoint": None}})
