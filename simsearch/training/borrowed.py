"""The two command functions fine-tuning still borrows from `simsearch.stages` (extraction, for the cached features
and the frozen baseline; the evaluation core, for validation). Here alone, so that moving them into library
modules is one edit: the import-linter contract lists exactly these two imports as its exceptions."""

from simsearch.stages.evaluate import evaluate_embeddings
from simsearch.stages.extract import extract

__all__ = ["evaluate_embeddings", "extract"]
