"""simsearch benchmarks, each side by side with the plain way of doing the same job, in the same run.

    python scripts/bench.py                 # every section at full size
    python scripts/bench.py --quick         # reduced sizes: minutes on 2 CPU cores
    python scripts/bench.py --sections eval,index

Prints a table and writes JSON (hardware, library versions, every figure) to --out.
Timings are wall-clock after a warm-up; compare only figures from the same run and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/ for reference_pipeline

from omegaconf import OmegaConf  # noqa: E402

from simsearch.config import Config  # noqa: E402
from simsearch.store import create_store, library_versions  # noqa: E402

SCHEMA = OmegaConf.structured(Config)
Row = dict[str, object]


def clustered_unit_vectors(n: int, dim: int, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    vectors = centres[labels] + rng.normal(size=(n, dim)).astype(np.float32) * 6.0  # overlapping classes: P@10 below 1
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, labels


def timed(function: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- evaluation


def plain_torchmetrics(vectors: np.ndarray, labels: np.ndarray, ks: list[int], only_p10: bool) -> dict[str, float]:
    """The plain way: the full N x N similarity matrix through torchmetrics' retrieval metrics.

    `only_p10`: Precision@10 alone (the original report's number); else the metric set `simsearch eval`
    computes by default (P@K, R@K, mAP@K for each K, and R-precision; MAP@R has no torchmetrics twin).
    """
    from torchmetrics.retrieval import RetrievalMAP, RetrievalPrecision, RetrievalRecall, RetrievalRPrecision

    n = len(labels)
    x = torch.from_numpy(vectors)
    similarity = x @ x.T + 2.0  # shifted positive: torchmetrics drops scores <= 0
    similarity.fill_diagonal_(-1.0)  # own row: ranks last and, being <= 0, is never retrieved
    preds = similarity.flatten()
    target = torch.from_numpy(labels[:, None] == labels[None, :])
    target.fill_diagonal_(False)  # leave-one-out: a query is not relevant to itself
    target = target.flatten()
    indexes = torch.arange(n)[:, None].expand(n, n).flatten()
    if only_p10:
        return {"precision@10": float(RetrievalPrecision(top_k=10)(preds, target, indexes))}
    values = {"r_precision": float(RetrievalRPrecision()(preds, target, indexes))}
    for k in ks:
        for name, metric in (("precision", RetrievalPrecision), ("recall", RetrievalRecall), ("map", RetrievalMAP)):
            values[f"{name}@{k}"] = float(metric(top_k=k)(preds, target, indexes))
    return values


def bench_eval(sizes: list[int], dim: int, workdir: Path, full_plain_up_to: int) -> list[Row]:
    from simsearch.evaluate import evaluate_store

    ks = list(SCHEMA.eval.k)
    rows = []
    for n in sizes:
        vectors, labels = clustered_unit_vectors(n, dim)
        items = [{"id": str(i), "index": i} for i in range(n)]
        store = create_store(workdir / f"eval-{n}", vectors, labels, items,
                             {"data": {"classes": [str(c) for c in range(10)]}, "model": {}})
        eval_cfg = OmegaConf.merge(SCHEMA.eval, {"device": "auto"})
        seconds, metrics = timed(lambda: evaluate_store(store, eval_cfg, SCHEMA.index))
        row: Row = {"section": "eval", "case": f"{n} x {n}, d={dim}, K={ks} + MAP@R",
                    "simsearch_s": round(seconds, 2), "P@10": round(metrics["precision@10"], 4)}
        if n * n > 1.2e8:
            row["note"] = f"plain way not run: its N x N tensors need ~{13 * n * n / 1e9:.0f} GB"
            rows.append(row)
            continue
        p10_seconds, plain = timed(lambda: plain_torchmetrics(vectors, labels, ks, only_p10=True))
        row.update(plain_p10_only_s=round(p10_seconds, 2), ratio_p10_only=round(p10_seconds / seconds, 1),
                   plain_P10=round(plain["precision@10"], 4))
        if n <= full_plain_up_to:
            same_seconds, plain = timed(lambda: plain_torchmetrics(vectors, labels, ks, only_p10=False))
            worst = max(abs(plain[name] - metrics[name]) for name in plain)
            row.update(plain_same_metrics_s=round(same_seconds, 2), ratio_same_metrics=round(same_seconds / seconds, 1),
                       max_metric_difference=float(f"{worst:.1e}"))
        rows.append(row)
    return rows


# ---------------------------------------------------------------- indexes


def bench_index(sizes: list[int], dim: int, workdir: Path, queries: int = 1000) -> list[Row]:
    from simsearch.index import FaissSearcher, build_index

    rows = []
    for n in sizes:
        vectors, labels = clustered_unit_vectors(n, dim, classes=100)
        items = [{"id": str(i), "index": i} for i in range(n)]
        store = create_store(workdir / f"index-{n}", vectors, labels, items, {"data": {}, "model": {}})
        query_vectors = vectors[:queries]
        lists = max(16, int(4 * np.sqrt(n)))
        exact_rows = None
        for factory, params in (("Flat", ""), (f"IVF{lists},Flat", "nprobe=16"), ("HNSW32", "efSearch=64"),
                                (f"IVF{lists},PQ{dim // 16}", "nprobe=16")):
            cfg = OmegaConf.merge(SCHEMA.index, {"factory": factory, "search_params": params,
                                                 "train_size": min(n, 50 * lists)})
            build_seconds, (index, _) = timed(lambda cfg=cfg: build_index(store, cfg))
            searcher = FaissSearcher(index, "auto")
            searcher.search(query_vectors[:10], 10)
            seconds, (_, found) = timed(lambda s=searcher: s.search(query_vectors, 10))
            if exact_rows is None:
                exact_rows = found
            recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(found, exact_rows)]))
            rows.append({"section": "index", "case": f"{factory} ({params or 'exact'}), n={n}, d={dim}",
                         "build_s": round(build_seconds, 2), "queries_per_s": round(queries / seconds, 1),
                         "recall@10_vs_exact": round(recall, 4), "device": searcher.description})
    return rows


SECTIONS = {"eval", "index"}


def hardware() -> dict[str, object]:
    info: dict[str, object] = {"machine": platform.machine(), "processor": platform.processor(),
                               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def print_table(rows: list[Row]) -> None:
    for section in dict.fromkeys(r["section"] for r in rows):
        selected = [r for r in rows if r["section"] == section]
        columns = [c for c in dict.fromkeys(k for r in selected for k in r) if c != "section"]
        widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in selected)) for c in columns}
        print(f"\n== {section} ==")
        print("  ".join(c.ljust(widths[c]) for c in columns))
        for r in selected:
            print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in columns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes (minutes on 2 CPU cores)")
    parser.add_argument("--sections", default=",".join(sorted(SECTIONS)), help="comma-separated: " + ",".join(SECTIONS))
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the JSON results")
    arguments = parser.parse_args()
    sections = [s for s in arguments.sections.split(",") if s]
    unknown = set(sections) - SECTIONS
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {sorted(SECTIONS)}")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        if "eval" in sections:
            quick = arguments.quick
            rows += bench_eval([2_000, 10_000] if quick else [10_000, 100_000], 2048, workdir,
                               full_plain_up_to=2_000 if quick else 10_000)
        if "index" in sections:
            rows += bench_index([10_000, 100_000] if arguments.quick else [100_000, 1_000_000],
                                256 if arguments.quick else 2048, workdir)
    print_table(rows)
    result = {"hardware": hardware(), "versions": library_versions(), "quick": arguments.quick,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "peak_rss_mb": round(peak_rss_mb(), 1), "rows": rows}
    arguments.out.mkdir(parents=True, exist_ok=True)
    path = arguments.out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
