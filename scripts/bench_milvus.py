"""FAISS and Milvus Lite side by side on one store of clustered unit vectors with a catalogue column: publish /
build time, peak memory, p50 / p99 latency of one query (simsearch's API, as a user calls it) without a filter
and with filters keeping 1%, 10% and 50% of the items, recall@10 against a numpy brute force over the matching
rows, and the rows sent to Milvus when one catalogue row changes.

    python scripts/bench_milvus.py                # 10^6 x 256 (minutes and several GB)
    python scripts/bench_milvus.py --quick        # 20,000 x 256: a minute on 2 CPU cores
    python scripts/bench_milvus.py --items 100000 --out bench-results/milvus.json

Prints a table and writes JSON (hardware, library versions, every figure) to --out.
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
from pathlib import Path

import numpy as np

import simsearch
from simsearch.milvus import MilvusIndex
from simsearch.store import create_store, library_versions

SELECTIVITY = {"none": None, "1%": "bucket < 1", "10%": "bucket < 10", "50%": "bucket < 50"}
K = 10


def make_store(path: Path, items: int, dim: int, seed: int, changed_row: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A store of clustered unit vectors with one int column `bucket` (0..99, uniform): `bucket < p` keeps p%."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 100, items)
    vectors = rng.normal(size=(100, dim)).astype(np.float32)[labels] + 4 * rng.normal(size=(items, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    buckets = rng.integers(0, 100, items)
    metadata = [{"bucket": int(b), "price": float(i % 500)} for i, b in enumerate(buckets)]
    if changed_row is not None:
        metadata[changed_row]["price"] += 1
    records = [{"id": f"v{i}", "index": i, "key": f"test/{i}", "label": f"c{y}"} for i, y in enumerate(labels)]
    create_store(path, vectors, labels, records, {"data": {"name": "vectors", "classes": [f"c{c}" for c in range(100)]},
                                                 "model": {}, "fingerprint": {"bench": str(seed)}}, metadata)
    return vectors, buckets


def latencies(store: simsearch.Store, queries: np.ndarray, where: str | None) -> tuple[list[float], list[list[int]]]:
    times, found = [], []
    store.search(queries[0], k=K, filter=where)  # warm-up: index loaded, filter columns built
    for query in queries:
        started = time.perf_counter()
        results = store.search(query, k=K, filter=where)
        times.append(time.perf_counter() - started)
        found.append([n.row for n in results])
    return times, found


def exact_top_k(vectors: np.ndarray, keep: np.ndarray, queries: np.ndarray) -> list[list[int]]:
    rows = np.flatnonzero(keep)
    scores = queries @ vectors[rows].T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return [rows[o].tolist() for o in order]


def recall(found: list[list[int]], truth: list[list[int]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / max(1, len(t)) for f, t in zip(found, truth)]))


def phase(text: str) -> None:
    """Progress on stderr: a 10^6 run takes a while, and one stopped early still says how far it got."""
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {text}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="20,000 items, 100 queries")
    parser.add_argument("--out", default="bench-results/milvus.json")
    args = parser.parse_args()
    if args.quick:
        args.items, args.queries = 20_000, 100
    with tempfile.TemporaryDirectory(prefix="simsearch-bench-milvus-") as scratch:
        store_dir = Path(scratch) / "store"
        started = time.perf_counter()
        phase(f"writing a store of {args.items} x {args.dim}")
        vectors, buckets = make_store(store_dir, args.items, args.dim, seed=0)
        made_s = time.perf_counter() - started
        rng = np.random.default_rng(1)
        queries = vectors[rng.choice(args.items, args.queries, replace=False)] + 0.05 * rng.normal(size=(args.queries, args.dim))
        queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
        truth = {name: exact_top_k(vectors, np.ones(args.items, bool) if where is None else buckets < int(where.split("<")[1]),
                                   queries) for name, where in SELECTIVITY.items()}
        rows = []
        for backend in ("faiss", "milvus"):
            phase(f"{backend}: build or publish")
            store = simsearch.open(store_dir, f"index.backend={backend}", "index.factory=Flat", verify=False)
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            started = time.perf_counter()
            if backend == "milvus":
                MilvusIndex(store.files, store.cfg.index).publish()
            store._searcher_once()  # FAISS: builds and saves index.faiss; Milvus: opens the collection, in step
            build_s = time.perf_counter() - started
            peak_mb = max(rss_before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
            for name, where in SELECTIVITY.items():
                phase(f"{backend}: {args.queries} queries, filter {name}")
                times, found = latencies(store, queries, where)
                rows.append({"backend": backend, "filter": name, "publish_or_build_s": round(build_s, 2),
                             "p50_ms": round(1000 * float(np.percentile(times, 50)), 2),
                             "p99_ms": round(1000 * float(np.percentile(times, 99)), 2),
                             "recall@10": round(recall(found, truth[name]), 4), "peak_rss_mb": round(peak_mb),
                             "children_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)})
            write_report(args, rows, None, made_s)  # each back end's figures kept as soon as measured
        phase("one catalogue row changed: publishing again")
        # one catalogue row changed, the same store written again: the rows Milvus is sent. The collection's
        # client stays open: Milvus Lite serves one file to one process, and a client closed and opened again
        # in the same process after minutes found its embedded server gone (grpc "Too many pings")
        make_store(store_dir, args.items, args.dim, seed=0, changed_row=args.items // 2)
        store = simsearch.open(store_dir, "index.backend=milvus", verify=False)
        try:
            update = MilvusIndex(store.files, store.cfg.index).publish()
        except Exception as error:  # noqa: BLE001 - the figures above are kept; say what failed
            update = {"failed": str(error), "upserted": "-", "deleted": "-", "unchanged": "-", "seconds": float("nan")}
    write_report(args, rows, update, made_s)


def write_report(args: argparse.Namespace, rows: list[dict], update: dict | None, made_s: float) -> None:
    """Print the table and write the JSON of what is measured so far (a late failure loses nothing)."""
    print(f"{args.items} vectors x {args.dim} (store written in {made_s:.1f} s), {args.queries} single queries, k={K}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'backend':<8} {'filter':<6} {'build/publish s':>15} {'p50 ms':>8} {'p99 ms':>8} {'recall@10':>9} {'peak RSS MB':>11}")
    for row in rows:
        print(f"{row['backend']:<8} {row['filter']:<6} {row['publish_or_build_s']:>15} {row['p50_ms']:>8} {row['p99_ms']:>8} "
              f"{row['recall@10']:>9} {row['peak_rss_mb']:>11}")
    if update is not None:
        print(f"one catalogue row changed: {update['upserted']} upserted, {update['deleted']} deleted, "
              f"{update['unchanged']} unchanged in {update['seconds']:.2f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"items": args.items, "dim": args.dim, "queries": args.queries, "k": K, "rows": rows,
              "one_row_changed": update, "store_written_s": round(made_s, 2), "load_average": os.getloadavg(),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "versions": library_versions()}
    partial = out.with_suffix(".json.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, out)
    print(f"Saved: {out}", flush=True)


if __name__ == "__main__":
    main()
