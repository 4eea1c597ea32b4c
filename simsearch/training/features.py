"""Backbone features without training: the cache of the train split's features (frozen mode, one store per
augmented view), a frozen-head checkpoint applied to a baseline store, and the baseline a checkpoint started from."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from simsearch.config import save_config
from simsearch.errors import SimsearchError
from simsearch.extraction import extract_store as extract
from simsearch.identity import MODEL_SETTINGS, embedder_identity, first_difference, stored_identity
from simsearch.model import checkpoint_metadata, load_finetuned_embedder, resolve_model_config
from simsearch.store import Store, create_store
from simsearch.training.losses import LOSSES

log = logging.getLogger(__name__)


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
