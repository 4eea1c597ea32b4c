"""The embedding space in 2-D (UMAP or t-SNE), the library under `simsearch map`.

Stores larger than `map.max_items` are subsampled, uniformly at random with `run.seed`, so the same
command draws the same map. Vectors wider than 50 are first reduced to 50 by PCA (standard practice
before t-SNE and UMAP; it keeps the neighbourhoods and saves most of the time).
"""

from __future__ import annotations

import numpy as np

from simsearch.errors import SimsearchError

PCA_DIM = 50
METHODS = ("umap", "tsne")


def sample_rows(count: int, max_items: int, seed: int) -> np.ndarray:
    """All rows, or `max_items` of them drawn uniformly without replacement (seeded), in row order."""
    if max_items < 3:
        raise SimsearchError(f"map.max_items must be at least 3, not {max_items}")
    if count <= max_items:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=max_items, replace=False))


def project(vectors: np.ndarray, method: str, neighbours: int, seed: int) -> np.ndarray:
    """(N, D) vectors to (N, 2) points with UMAP or t-SNE, after PCA to 50 dimensions when wider."""
    if method not in METHODS:
        raise SimsearchError(f"map.method must be umap or tsne, not '{method}'")
    if len(vectors) < 3:
        raise SimsearchError(f"a map needs at least 3 items, the store has {len(vectors)}")
    if vectors.shape[1] > PCA_DIM and len(vectors) > PCA_DIM:
        from sklearn.decomposition import PCA

        vectors = PCA(PCA_DIM, random_state=seed).fit_transform(vectors)
    neighbours = max(2, min(neighbours, len(vectors) - 1))
    if method == "umap":
        import umap

        reducer = umap.UMAP(n_neighbors=neighbours, min_dist=0.1, random_state=seed, n_jobs=1,  # seeded: one thread
                            init="spectral" if len(vectors) > 100 else "random")
        return reducer.fit_transform(vectors)
    from sklearn.manifold import TSNE

    perplexity = float(min(neighbours, (len(vectors) - 1) / 3))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(vectors)
