"""Exact top-k by inner product (= cosine: the vectors are unit norm), blocked so memory never holds N x N:
numpy on the CPU, torch on GPUs, one tie rule everywhere (equal scores rank by row, lowest first).

A small kernel over arrays and files of rows (DINOv2's sharded kNN): evaluation, search and duplicates
all call it; it knows nothing of stores, configs or FAISS (`simsearch.index`).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from simsearch.errors import SimsearchError
from simsearch.files import file_identity
from simsearch.lazy import LazyModule
from simsearch.runtime import cuda_available

torch = LazyModule("torch")  # imported on first use: a search by item never needs it

log = logging.getLogger(__name__)
class Searcher(Protocol):
    description: str

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) float32 -> scores (Q, k) float32 and rows (Q, k) int64, best first; -1 where none."""
        ...


class StoredRows:
    """The (N, D) rows of a .npy file on disk, read a range at a time with plain file reads.

    Deliberately not memory-mapped: the pages of a mapping stay in the process's resident set once
    touched, so streaming a mapped store of 10^6 rows would grow RSS to the store's size. Read this
    way, the file passes through the page cache and the process holds only the rows it asked for.
    The file stays open: a store re-extracted (replaced on disk) during a long evaluation is still
    read whole as it was, never half old and half new. `identity` (`Store.embeddings_identity`):
    the file must be the one its store verified, else one sentence refuses it.
    """

    def __init__(self, path: Path | str, identity: tuple[int, int, int, int] | None = None):
        self.path = Path(path)
        try:
            self._handle = open(self.path, "rb")
            version = np.lib.format.read_magic(self._handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(self._handle)
            self.offset = self._handle.tell()
            opened = file_identity(os.fstat(self._handle.fileno()))
        except (OSError, ValueError) as error:
            raise SimsearchError(f"cannot read the embeddings {self.path}: {error}") from None
        if identity is not None and opened != identity:
            self.close()
            raise SimsearchError(f"{self.path} was replaced after its store was opened (re-extracted?): "
                                 "nothing was evaluated; run again")
        if fortran_order or len(shape) != 2 or dtype.kind != "f":
            self.close()
            raise SimsearchError(f"{self.path} must hold a C-ordered (N, D) float array, not {dtype} {shape}")
        self.shape, self.dtype = tuple(shape), dtype
        self.row_bytes = shape[1] * dtype.itemsize
        self._lock = threading.Lock()  # one seek-and-read at a time: shards are searched in threads

    def close(self) -> None:
        self._handle.close()

    def __del__(self) -> None:
        if hasattr(self, "_handle"):
            self._handle.close()

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, start: int, count: int) -> np.ndarray:
        rows = np.empty((count, self.shape[1]), dtype=self.dtype)  # read straight into the array: no bytes copy
        if rows.size == 0:
            return rows
        with self._lock:
            self._handle.seek(self.offset + start * self.row_bytes)
            complete = self._handle.readinto(memoryview(rows).cast("B")) == count * self.row_bytes
        if not complete:
            raise SimsearchError(f"{self.path} is truncated: rows {start}..{start + count - 1} are missing")
        return rows

    def block(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 as float32, (rows, D)."""
        stop = min(stop, len(self))
        return self._read(start, max(0, stop - start)).astype(np.float32, copy=False)

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows, in the given order, as float32; consecutive rows are read in one call."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise SimsearchError(f"rows outside 0..{len(self) - 1} asked of {self.path}")
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        run_starts = np.flatnonzero(np.diff(ordered, prepend=-2) != 1)
        for first, last in zip(run_starts, [*run_starts[1:], len(ordered)]):
            out[order[first:last]] = self._read(int(ordered[first]), int(ordered[last - 1] - ordered[first] + 1))[
                ordered[first:last] - ordered[first]]
        return out


def read_rows(vectors: np.ndarray | StoredRows, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 of an array or a file as contiguous float32."""
    if isinstance(vectors, StoredRows):
        return vectors.block(start, stop)
    return np.ascontiguousarray(vectors[start:stop], dtype=np.float32)


def take_rows(vectors: np.ndarray | StoredRows, rows: np.ndarray) -> np.ndarray:
    """The given rows of an array or a file as contiguous float32."""
    if isinstance(vectors, StoredRows):
        return vectors.take(rows)
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


DEVICE_NAME = re.compile(r"cpu|cuda(:\d+)?")
CPU_TILE_ELEMENTS = 1 << 24  # a query tile x block of float32 scores on the CPU: 64 MB
PARTITION_ELEMENTS = 1 << 22  # rows x width partitioned at once on the CPU (int64 positions: 32 MB)


def resolve_devices(device: str) -> list[str]:
    """'auto' or 'cuda': every visible GPU (the CPU when there is none for 'auto'); 'cpu'; or a
    comma-separated list such as 'cuda:0,cuda:2' (or 'cpu,cpu', which runs the multi-device path on the CPU).
    torch is imported only when a GPU may be there."""
    names = [name.strip() for name in str(device).split(",") if name.strip()]
    if len(names) == 1 and names[0] in ("auto", "gpu", "cuda"):
        if cuda_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if names[0] != "auto":
            raise SimsearchError(f"device={device} was asked for, but torch sees no GPU")
        return ["cpu"]
    if not names:
        raise SimsearchError("device must name at least one device (auto, cpu, cuda, cuda:0,cuda:1)")
    for name in names:
        if not DEVICE_NAME.fullmatch(name):
            raise SimsearchError(f"device must be auto, cpu, cuda or a list such as cuda:0,cuda:1, not '{device}'")
    names = [f"cuda:{torch.cuda.current_device() if cuda_available() else 0}" if n == "cuda" else n for n in names]
    gpus = torch.cuda.device_count() if any(n != "cpu" for n in names) and cuda_available() else 0
    for name in names:
        if name != "cpu" and int(name.split(":")[1]) >= gpus:
            raise SimsearchError(f"device {name} was asked for, but torch sees {gpus} GPU(s)")
    return names


def top_k_lowest_first(scores: torch.Tensor, k: int, tie_rows_at_once: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (scores, columns) of each row, best first; equal scores are ordered by column, lowest first.

    torch.topk leaves the order of ties unspecified, so results could change with the block size or
    the device; here they are exact and repeatable. Only rows whose (k+1)-th best equals their k-th
    (a tie across the cut) are redone, `tie_rows_at_once` at a time, so memory stays near the tile's.
    """
    width = scores.shape[1]
    values, columns = scores.topk(min(k + 1, width), dim=1)  # (Q, k+1), best first, ties in any order
    kth = values[:, k - 1 : k]
    if width > k:
        crowded = (values[:, k] == values[:, k - 1]).nonzero(as_tuple=True)[0]
    else:  # every column is taken: no cut to tie across
        crowded = torch.zeros(0, dtype=torch.long, device=scores.device)
    columns = columns[:, :k].clone()
    for first in range(0, len(crowded), tie_rows_at_once):
        rows = crowded[first : first + tie_rows_at_once]
        tile, cut = scores[rows], kth[rows]
        at_cut = tile == cut
        wanted = k - (tile > cut).sum(dim=1, keepdim=True)
        take = (tile > cut) | (at_cut & (at_cut.cumsum(dim=1) <= wanted))
        columns[rows] = take.nonzero(as_tuple=True)[1].view(len(rows), k)
    columns = columns.sort(dim=1).values
    picked = scores.gather(1, columns)
    order = picked.sort(dim=1, descending=True, stable=True).indices
    return picked.gather(1, order), columns.gather(1, order)


def top_k_lowest_first_numpy(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`top_k_lowest_first` for numpy arrays (the CPU path): argpartition, then the same repair of the
    rows with a tie across the cut; the (rows, width) index arrays are made a few rows at a time."""
    count, width = scores.shape
    k = min(k, width)
    if k == width:
        columns = np.broadcast_to(np.arange(width), (count, width)).copy()
    else:
        columns = np.empty((count, k), dtype=np.int64)
        step = max(1, PARTITION_ELEMENTS // width)
        for first in range(0, count, step):
            tile = scores[first : first + step]
            candidates = np.argpartition(tile, width - k - 1, axis=1)[:, width - k - 1 :]  # [:, 0] is the (k+1)-th best
            values = np.take_along_axis(tile, candidates, axis=1)
            cut = values[:, 1:].min(axis=1)  # the k-th best
            columns[first : first + step] = candidates[:, 1:]
            for row in np.flatnonzero(values[:, 0] == cut):  # a tie across the cut: the lowest columns of the tied
                greater = np.flatnonzero(tile[row] > cut[row])
                columns[first + row] = np.concatenate([greater, np.flatnonzero(tile[row] == cut[row])[: k - len(greater)]])
    columns.sort(axis=1)
    picked = np.take_along_axis(scores, columns, axis=1)
    order = np.argsort(-picked, axis=1, kind="stable")
    return np.take_along_axis(picked, order, axis=1), np.take_along_axis(columns, order, axis=1)


def merge_top_k(first: tuple[Any, Any], second: tuple[Any, Any], k: int) -> tuple[Any, Any]:
    """Merge two top lists (torch tensors or numpy arrays) whose rows are all lower in `first` than in
    `second` (ties: lower row first)."""
    if isinstance(first[0], np.ndarray):
        scores, rows = np.concatenate([first[0], second[0]], axis=1), np.concatenate([first[1], second[1]], axis=1)
        best, positions = top_k_lowest_first_numpy(scores, min(k, scores.shape[1]))
        return best, np.take_along_axis(rows, positions, axis=1)
    scores = torch.cat([first[0], second[0]], dim=1)
    rows = torch.cat([first[1], second[1]], dim=1)
    best, positions = top_k_lowest_first(scores, min(k, scores.shape[1]))
    return best, rows.gather(1, positions)


class ExactSearcher:
    """Exact inner-product search by blocked float32 matrix products: numpy on the CPU (no torch
    imported), torch on GPUs.

    The store (an array, or a `StoredRows` file read block by block) is cut into blocks of
    `block_rows`; queries come in chunks, each chunk is scored against one block at a time, its top-k
    kept and merged, so memory is chunk x block, never N x N nor the whole store (DINOv2's kNN
    scheme). With several devices, each holds a contiguous shard of the blocks (DINOv2's sharded
    reference set), searches it in its own thread and the shards' top-k are merged by row. On GPUs
    the blocks stay on their device when a shard fits in half its free memory; otherwise, and
    always on the CPU, they are read again for every chunk. Ties are ranked by row, lowest first.
    `ranks` (rank, world size), under a launcher: this process searches only its rank's contiguous
    share of the blocks, and every rank's top-k lists are gathered and merged (`gather_top_k_across_ranks`).
    `torch_on_cpu` runs the GPU code on the CPU (for tests on machines without a GPU).
    """

    def __init__(self, vectors: np.ndarray | StoredRows, device: str = "auto", block_rows: int = 65_536,
                 torch_on_cpu: bool = False, ranks: tuple[int, int] | None = None):
        if block_rows < 1:
            raise SimsearchError(f"the block size must be at least 1 row, not {block_rows}")
        self.vectors = vectors
        self.devices = resolve_devices(device)
        self.device = self.devices[0]
        # never larger than the store: a huge eval.block_rows would otherwise shrink the CPU's query tile to 1
        block_rows = min(block_rows, max(1, len(vectors)))
        self.block_rows = block_rows
        self.torch_on_cpu = torch_on_cpu
        self.count = len(vectors)
        self.rank, self.world = ranks or (0, 1)
        blocks = list(range(0, self.count, block_rows))
        per_rank = -(-len(blocks) // self.world)  # under a launcher: this rank's contiguous share of the blocks
        blocks = blocks[self.rank * per_rank : (self.rank + 1) * per_rank]
        per_device = -(-len(blocks) // len(self.devices)) if blocks else 0
        self.shards = [(d, blocks[i * per_device : (i + 1) * per_device]) for i, d in enumerate(self.devices)]
        self.shards = [(d, starts) for d, starts in self.shards if starts]
        self.resident: dict[int, torch.Tensor] = {}
        self.keep_blocks = self._shards_fit_on_gpus(per_device * block_rows * int(vectors.shape[1]) * 4)
        where = ", ".join(self.devices)
        kind = "torch" if torch_on_cpu or any(d != "cpu" for d in self.devices) else "numpy"
        of_ranks = f", rank {self.rank} of {self.world}" if self.world > 1 else ""
        self.description = f"exact {kind} search on {where} ({len(blocks)} block(s) of {block_rows} rows{of_ranks})"

    def _shards_fit_on_gpus(self, shard_bytes: int) -> bool:
        if any(d == "cpu" for d in self.devices):
            return False
        return all(shard_bytes < torch.cuda.mem_get_info(torch.device(d))[0] // 2 for d in self.devices)

    def _block(self, start: int, device: str) -> torch.Tensor:
        if start in self.resident:
            return self.resident[start]
        block = torch.from_numpy(read_rows(self.vectors, start, start + self.block_rows)).to(device)
        if self.keep_blocks:
            self.resident[start] = block
        return block

    def _search_shard_torch(self, device: str, starts: list[int], queries: np.ndarray, k: int,
                            exclude_rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        query = torch.from_numpy(queries).to(device)
        exclude = None if exclude_rows is None else torch.as_tensor(exclude_rows, device=device)
        best: tuple[torch.Tensor, torch.Tensor] | None = None
        for start in starts:
            block = self._block(start, device)
            scores = query @ block.T  # (queries, block rows)
            if exclude is not None:  # a query's own row is removed by id, whatever it scores
                inside = (exclude >= start) & (exclude < start + len(block))
                scores[inside.nonzero(as_tuple=True)[0], exclude[inside] - start] = float("-inf")
            top_scores, top_columns = top_k_lowest_first(scores, min(k, len(block)))
            found = (top_scores, top_columns + start)
            best = found if best is None else merge_top_k(best, found, k)
        return best[0].cpu().numpy(), best[1].cpu().numpy()

    def _search_shard_numpy(self, starts: list[int], queries: np.ndarray, k: int,
                            exclude_rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        tile = max(1, CPU_TILE_ELEMENTS // self.block_rows)  # queries scored against a block at once
        best: list[tuple[np.ndarray, np.ndarray] | None] = [None] * -(-len(queries) // tile)
        for start in starts:
            block = read_rows(self.vectors, start, start + self.block_rows)
            for number, first in enumerate(range(0, len(queries), tile)):
                scores = queries[first : first + tile] @ block.T
                if exclude_rows is not None:  # a query's own row is removed by id, whatever it scores
                    own = exclude_rows[first : first + tile] - start
                    inside = np.flatnonzero((own >= 0) & (own < len(block)))
                    scores[inside, own[inside]] = -np.inf
                top_scores, top_columns = top_k_lowest_first_numpy(scores, min(k, len(block)))
                found = (top_scores, top_columns + start)
                best[number] = found if best[number] is None else merge_top_k(best[number], found, k)
        return np.concatenate([b[0] for b in best]), np.concatenate([b[1] for b in best])

    def _search_shard(self, device: str, starts: list[int], queries: np.ndarray, k: int,
                      exclude_rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if device == "cpu" and not self.torch_on_cpu:
            return self._search_shard_numpy(starts, queries, k, exclude_rows)
        return self._search_shard_torch(device, starts, queries, k, exclude_rows)

    def search(self, queries: np.ndarray, k: int, exclude_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) queries -> scores and rows (Q, k), best first; `exclude_rows[i]` is never returned for query i."""
        k = min(k, self.count)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if exclude_rows is not None:
            exclude_rows = np.asarray(exclude_rows, dtype=np.int64)
        if k == 0 or len(queries) == 0:  # the same on every rank: no collective is skipped by one alone
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if len(self.shards) > 1:
            with ThreadPoolExecutor(len(self.shards)) as pool:
                results = list(pool.map(lambda shard: self._search_shard(*shard, queries, k, exclude_rows), self.shards))
        else:
            results = [self._search_shard(*shard, queries, k, exclude_rows) for shard in self.shards]
        best_scores, best_rows = results[0] if results else (np.zeros((len(queries), 0), np.float32),
                                                             np.zeros((len(queries), 0), np.int64))
        for scores, rows in results[1:]:  # shards hold increasing rows: merge in order
            best_scores, best_rows = merge_top_k((best_scores, best_rows), (scores, rows), k)
        if self.world > 1:
            best_scores, best_rows = gather_top_k_across_ranks(best_scores, best_rows, k)
        best_rows = np.where(best_scores == -np.inf, -1, best_rows)
        return best_scores, best_rows


def gather_top_k_across_ranks(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's top-k lists (rank r holds lower rows than rank r + 1), gathered and merged in rank
    order (DINOv2's sharded kNN): every rank returns the same lists. Padded to k with -inf (row -1)."""
    import torch.distributed as dist

    padded_scores = np.full((len(scores), k), -np.inf, dtype=np.float32)
    padded_rows = np.full((len(rows), k), -1, dtype=np.int64)
    padded_scores[:, : scores.shape[1]], padded_rows[:, : rows.shape[1]] = scores, rows
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    gathered = []
    for array in (padded_scores, padded_rows):
        mine = torch.from_numpy(array).to(device)
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, mine)
        gathered.append([part.cpu().numpy() for part in parts])
    best = (gathered[0][0], gathered[1][0])
    for part_scores, part_rows in zip(gathered[0][1:], gathered[1][1:]):
        best = merge_top_k(best, (part_scores, part_rows), k)
    return best


def search_without_self(searcher: Any, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, rows) of queries that are items of the store, each one's own row excluded by id."""
    if isinstance(searcher, ExactSearcher):
        return searcher.search(queries, k, exclude_rows=rows)
    scores, found = searcher.search(queries, k + 1)
    own = found == rows[:, None]
    own[~own.any(axis=1), -1] = True  # self not among k + 1 (ties, approximate index): drop the last
    first_own = own & (np.cumsum(own, axis=1) == 1)
    return scores[~first_own].reshape(len(rows), k), found[~first_own].reshape(len(rows), k)
