"""What fine-tuning trains on: the seeded train/validation split, cached backbone features (frozen mode) or a
collection's images (end to end), and their data loaders."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from simsearch.data import ImageCollection
from simsearch.data.loading import collate
from simsearch.errors import SimsearchError
from simsearch.index import faiss_left_as_it_was
from simsearch.training.losses import LOSSES


def split_rows(count: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of the train split's rows into (train, validation)."""
    order = np.random.default_rng(seed).permutation(count)
    held_out = max(1, int(round(count * val_fraction)))
    return np.sort(order[held_out:]), np.sort(order[:held_out])



class CachedFeatures(Dataset):
    """Rows of the cached backbone features: (D,) per item, or (views, D) for a label-free loss."""

    def __init__(self, features: torch.Tensor, labels: np.ndarray, rows: np.ndarray):
        self.features, self.labels, self.rows = features, torch.from_numpy(labels), torch.from_numpy(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        row = self.rows[position]
        return {"features": self.features[row], "label": self.labels[row]}


class LabelledImages(Dataset):
    """Items of an image collection (by row) with their labels (-1: none), for end-to-end training: the labels are
    given, so a label-free run never asks the collection for them."""

    def __init__(self, collection: ImageCollection, rows: np.ndarray, labels: np.ndarray):
        self.collection, self.rows, self.labels = collection, rows, labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict[str, Any]:
        row = int(self.rows[position])
        return {**self.collection[row], "label": int(self.labels[row])}


def collate_labelled(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch = collate(samples)
    batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return batch



def loaders(cfg: DictConfig, labels: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray,
            features: torch.Tensor | None, collection: ImageCollection | None) -> tuple[DataLoader, DataLoader]:
    with faiss_left_as_it_was():
        from pytorch_metric_learning.samplers import MPerClassSampler

    ft = cfg.finetune
    if features is not None:
        train_set, val_set, gather = CachedFeatures(features, labels, train_rows), CachedFeatures(features, labels, val_rows), None
    else:
        train_set, val_set = LabelledImages(collection, train_rows, labels), LabelledImages(collection, val_rows, labels)
        gather = collate_labelled
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

