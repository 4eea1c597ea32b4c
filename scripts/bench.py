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


def clustered_unit_vectors(n: int, dim: int, classes: int = 10, seed: int = 0, noise: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    vectors = centres[labels] + rng.normal(size=(n, dim)).astype(np.float32) * noise  # default: overlapping classes
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
    from simsearch.evaluation import evaluate_store

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


def write_vector_store_in_chunks(store_dir: Path, n: int, dim: int, classes: int, chunk: int = 50_000) -> None:
    """A labelled store of n clustered unit vectors, written chunk by chunk into a memory-mapped .npy:
    the vectors never whole in RAM, so the store can be larger than the memory the benchmark may use."""
    store_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    scratch = store_dir.parent / f".{store_dir.name}-vectors.npy"  # streamed to disk, then made a store by create_store
    embeddings = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, chunk):
        part = centres[labels[start : start + chunk]] + rng.normal(size=(min(chunk, n - start), dim)).astype(np.float32) * 4.0
        embeddings[start : start + chunk] = part / np.linalg.norm(part, axis=1, keepdims=True)
    embeddings.flush()
    items = [{"id": str(i), "index": i} for i in range(n)]
    create_store(store_dir, embeddings, labels.astype(np.int64), items,
                 {"data": {"classes": [str(c) for c in range(classes)]}, "model": {}})
    del embeddings
    scratch.unlink()


PLAIN_SAMPLED_EVAL = """
import json, resource, sys, numpy as np
store, rows_file, k = sys.argv[1], sys.argv[2], 10
vectors = np.load(store + "/embeddings.npy")            # the whole store in RAM
labels = np.load(store + "/labels.npy")
rows = np.load(rows_file)
hits = []
for start in range(0, len(rows), 256):                  # plain numpy: similarities, argpartition, argsort
    chunk = rows[start : start + 256]
    scores = vectors[chunk] @ vectors.T
    scores[np.arange(len(chunk)), chunk] = -np.inf       # leave-one-out
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1), axis=1)
    hits.append(labels[top] == labels[chunk][:, None])
hits = np.concatenate(hits)
print(json.dumps({"precision@10": float(hits.mean()), "hit@10": float(hits.any(axis=1).mean())}))
"""
PEAK_RSS_OF_CHILD = ("import json, resource, subprocess, sys; out = subprocess.run(sys.argv[1:], check=True, capture_output=True, "
                     "text=True).stdout.strip().splitlines(); print(json.dumps({'last_line': out[-1] if out else '', "
                     "'peak_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


def run_measuring_peak_rss(command: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in MB, last line printed) of a command run in its own process."""
    import subprocess

    start = time.perf_counter()
    output = subprocess.run([sys.executable, "-c", PEAK_RSS_OF_CHILD, *command], capture_output=True, text=True, check=True)
    result = json.loads(output.stdout)
    return time.perf_counter() - start, result["peak_kb"] / 1024, result["last_line"]


def bench_eval_sampled(n: int, queries: int, dim: int, workdir: Path) -> list[Row]:
    """`simsearch eval eval.queries=Q` on a store of n vectors (sampled queries, every item in the gallery):
    peak RSS of the whole process against the store's size, beside a plain numpy evaluation that loads
    the store whole (Precision@10 and hit@10 of the same sampled queries)."""
    from simsearch.evaluation import sample_queries

    store_dir = workdir / f"eval-sampled-{n}"
    classes = max(10, n // 100)  # ~100 items a class, as CUB-200 (~60) and Cars196 (~80)
    started = time.perf_counter()
    write_vector_store_in_chunks(store_dir, n, dim, classes)
    write_seconds = time.perf_counter() - started
    store_mb = (store_dir / "embeddings.npy").stat().st_size / 2**20
    script = Path(sys.executable).parent / "simsearch"
    seconds, peak_mb, _ = run_measuring_peak_rss(
        [str(script), "eval", f"run.dir={store_dir}", f"eval.queries={queries}", "eval.k=[1,10,100]", "logger=none",
         "eval.device=auto"])
    ours = json.loads((store_dir / "metrics.json").read_text())
    _, torch_alone_mb, _ = run_measuring_peak_rss([sys.executable, "-c", "import torch"])  # the floor of any torch process
    row: Row = {"section": "eval_sampled", "case": f"{queries} sampled queries x {n} items, d={dim}, {classes} classes",
                "store_mb": round(store_mb, 1), "store_write_s": round(write_seconds, 1),
                "simsearch_s": round(seconds, 1), "simsearch_peak_rss_mb": round(peak_mb, 1),
                "peak_rss_over_store": round(peak_mb / store_mb, 3), "import_torch_alone_rss_mb": round(torch_alone_mb, 1),
                "P@10": round(ours["precision@10"], 4), "hit@10": round(ours["hit@10"], 4),
                "metrics": "hit/P/R/mAP@{1,10,100}, MAP@R, R-precision (plain: P@10, hit@10)",
                "device": "GPU" if torch.cuda.is_available() else "CPU"}
    if queries * n * dim > 5e12:
        row["note"] = "plain numpy way not run: hours on a CPU at this size"
        return [row]
    rows_file = workdir / "sampled-rows.npy"
    np.save(rows_file, sample_queries(np.arange(n), queries, SCHEMA.run.seed)[0])
    plain_seconds, plain_peak_mb, plain_line = run_measuring_peak_rss(
        [sys.executable, "-c", PLAIN_SAMPLED_EVAL, str(store_dir), str(rows_file)])
    plain = json.loads(plain_line)
    row.update({"plain_numpy_s": round(plain_seconds, 1), "plain_peak_rss_mb": round(plain_peak_mb, 1),
                "plain_P@10": round(plain["precision@10"], 4), "plain_hit@10": round(plain["hit@10"], 4)})
    return [row]


# ---------------------------------------------------------------- indexes


def bench_index(sizes: list[int], dim: int, workdir: Path, queries: int = 1000) -> list[Row]:
    from simsearch.index import FaissSearcher, build_index

    rows = []
    for n in sizes:
        # many small clusters with room inside: neighbours are well defined, as in real embeddings
        vectors, labels = clustered_unit_vectors(n, dim, classes=max(10, n // 50), noise=0.5)
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


# ---------------------------------------------------------------- extraction, latency, memory


def write_cifar_batches(root: Path, images: np.ndarray) -> None:
    """CIFAR-10's on-disk format (the test batch only), so simsearch reads it through its real data path."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batch = {"batch_label": "test", "labels": [0] * len(images), "filenames": [""] * len(images),
             "data": images.transpose(0, 3, 1, 2).reshape(len(images), -1)}
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))


def simsearch_extract(arguments: list[str]) -> np.ndarray:
    from simsearch.config import load_config
    from simsearch.extraction import extract_store as extract

    cfg = load_config(arguments + ["logger=none", "trainer.enable_progress_bar=false"])
    extract(cfg)
    return np.load(Path(cfg.run.dir) / "embeddings.npy")


def loader_only_seconds(arguments: list[str]) -> float:
    """Time to produce every batch of simsearch's DataLoader with no model: the input pipeline's ceiling."""
    from simsearch.config import load_config
    from simsearch.data import Resize
    from simsearch.data.loading import ImageDataModule
    from simsearch.model import resolve_model_config

    cfg = load_config(arguments + ["logger=none"])
    model = resolve_model_config(cfg.model)
    datamodule = ImageDataModule(cfg.data, Resize(model.image_size, model.interpolation), cfg.run.seed,
                                 pin_memory=torch.cuda.is_available(),
                                 decode_on_device_by_default=torch.cuda.is_available())
    start = time.perf_counter()
    for _ in datamodule.predict_dataloader():
        pass
    return time.perf_counter() - start


def smooth_images(count: int, seed: int = 0) -> np.ndarray:
    """(count, 32, 32, 3) uint8 CIFAR-shaped images of upsampled noise: closer to photos than white noise, cheap to make."""
    small = np.random.default_rng(seed).integers(0, 256, (count, 8, 8, 3), dtype=np.uint8)
    upsampled = torch.nn.functional.interpolate(torch.from_numpy(small).permute(0, 3, 1, 2).float(), size=32, mode="bilinear")
    return np.asarray(upsampled.permute(0, 2, 3, 1).byte())


def random_resnet50_weights(path: Path) -> dict[str, torch.Tensor]:
    """Seeded random ResNet-50 weights (fc removed) saved at `path`: speed does not depend on the values."""
    from reference_pipeline import plain_model

    state = dict(plain_model(seed=0).state_dict())
    torch.save(state, path)
    return state


def bench_extract(count: int, image_size: int, workdir: Path) -> list[Row]:
    """In-process extraction throughput of simsearch's variants against the reference pipeline, same weights."""
    from reference_pipeline import plain_embed, plain_model

    images = smooth_images(count)
    weights = workdir / "resnet50-seed0.pth"
    state = random_resnet50_weights(weights)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = plain_model({**state, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    folder = workdir / "jpegs"
    folder.mkdir()
    for i, image in enumerate(images):
        from PIL import Image

        Image.fromarray(image).resize((96, 96)).save(folder / f"{i:06d}.jpg", quality=90)
    paths = sorted(folder.glob("*.jpg"))
    common = [f"model.weights={weights}", f"model.image_size={image_size}", "data.batch_size=64", "data.num_workers=2"]
    write_cifar_batches(workdir / "cifar", images)
    rows = []
    # on a CPU the default is the frozen network, in bf16 where the CPU has it natively (simsearch.model.inference)
    variants = [(", default", [])] + ([] if device == "cuda" else [
        (", frozen fp32", ["trainer.precision=32-true"]),
        (", eager fp32 (the default before fused inference)", ["model.inference=eager", "trainer.precision=32-true"])])
    for case, ours_args, plain_input in (
        ("CIFAR-shaped 32x32 uint8", ["data=cifar10", f"data.root={workdir / 'cifar'}", "data.download=false"], images),
        ("JPEG folder (96 px files)", ["data=folder", f"data.root={folder}", "data.labels=none"], paths),
    ):
        simsearch_extract(common + ours_args + ["data.limit=64", f"run.dir={workdir / 'warm'}"])  # warm-up
        plain_embed(reference, plain_input[:64], image_size, device=device)
        plain_s, plain = timed(lambda p=plain_input: plain_embed(reference, p, image_size, device=device))
        loader_s = loader_only_seconds(common + ours_args)
        for number, (variant, extra) in enumerate(variants):  # a fresh run.dir each: no store is reused
            arguments = common + ours_args + extra + [f"run.dir={workdir / f'ours-{case[:4]}-{number}'}"]
            ours_s, ours = timed(lambda a=arguments: simsearch_extract(a))
            cosine = np.sum(ours.astype(np.float64) * plain, axis=1)
            rows.append({"section": "extract", "case": f"{case}, {count} images at {image_size} px, {device}{variant}",
                         "simsearch_img_per_s": round(count / ours_s, 1), "reference_img_per_s": round(count / plain_s, 1),
                         "ratio": round(plain_s / ours_s, 2), "min_cosine_vs_reference": round(float(cosine.min()), 5),
                         "loader_only_img_per_s": round(count / loader_s, 1)})
    return rows


def run_process(command: list[str], cwd: Path) -> float:
    """Wall-clock seconds of a whole process, from its start to its exit."""
    import subprocess

    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed: {result.stderr[-2000:]}")
    return seconds


def process_inputs(count: int, folder: Path) -> tuple[Path, Path, Path]:
    """The same images as a CIFAR-10 test split (for simsearch) and as .npy (for the reference), and random weights."""
    folder.mkdir()
    images = smooth_images(count, seed=1)
    write_cifar_batches(folder / "cifar", images)
    np.save(folder / "images.npy", images)
    random_resnet50_weights(folder / "resnet50.pth")
    return folder / "cifar", folder / "images.npy", folder / "resnet50.pth"


def bench_whole_process(count: int, rounds: int, workdir: Path) -> list[Row]:
    """`simsearch extract` with default settings, as a user runs it (a new process: imports, model, W&B offline,
    the store), against a whole `scripts/reference_pipeline.py` process on the same images and weights at 224 px;
    the two alternate, `rounds` times each, and the median of each is compared."""
    folder = workdir / "process"
    cifar, images, weights = process_inputs(count, folder)
    plain_command = [sys.executable, str(Path(__file__).resolve().parent / "reference_pipeline.py"), "--npy", str(images),
                     "--weights", str(weights), "--out", str(folder / "plain.npy")]
    times: dict[str, list[float]] = {"simsearch": [], "reference": []}
    for number in range(rounds):
        times["reference"].append(run_process(plain_command, folder))
        ours_command = [str(Path(sys.executable).parent / "simsearch"), "extract", f"data.root={cifar}",
                        f"model.weights={weights}", f"run.dir={folder / f'store-{number}'}"]  # a fresh store each round
        times["simsearch"].append(run_process(ours_command, folder))
    ours, plain = float(np.median(times["simsearch"])), float(np.median(times["reference"]))
    cosine = np.sum(np.load(folder / f"store-{rounds - 1}" / "embeddings.npy").astype(np.float64)
                    * np.load(folder / "plain.npy"), axis=1)
    return [{"section": "process", "case": f"whole process, {count} CIFAR-shaped images at 224 px, default settings",
             "simsearch_s": round(ours, 1), "reference_s": round(plain, 1), "ratio": round(plain / ours, 2),
             "min_cosine_vs_reference": round(float(cosine.min()), 5), "rounds": rounds,
             "all_simsearch_s": [round(t, 1) for t in times["simsearch"]],
             "all_reference_s": [round(t, 1) for t in times["reference"]]}]


def seconds_to_first_shard(command: list[str], run_dir: Path, cwd: Path) -> float:
    """Seconds from starting `command` until a shard (an embedded batch) is on disk under `run_dir`."""
    import subprocess

    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = None
    while process.poll() is None and first is None:
        if any(run_dir.rglob("*.safetensors")):
            first = time.perf_counter() - start
        time.sleep(0.01)
    process.wait()
    if process.returncode != 0 or first is None:
        raise RuntimeError(f"{' '.join(command[:3])} ... ended ({process.returncode}) before a shard was seen")
    return first


def bench_startup(workdir: Path) -> list[Row]:
    """Start-up: from the command to the first image embedded (a collection of one image, its shard on disk),
    beside the imports alone and a whole reference process for the same image."""
    folder = workdir / "startup"
    cifar, images, weights = process_inputs(1, folder)
    python = sys.executable
    command = [str(Path(python).parent / "simsearch"), "extract", f"data.root={cifar}", f"model.weights={weights}"]
    first = [seconds_to_first_shard(command + [f"run.dir={folder / f'startup-{n}'}"], folder / f"startup-{n}", folder)
             for n in range(3)]
    imports = [run_process([python, "-c", "import simsearch.cli, simsearch.stages.extract"], folder) for _ in range(3)]
    torch_imports = [run_process([python, "-c", "import torch, torchvision.models"], folder) for _ in range(3)]
    plain = [run_process([python, str(Path(__file__).resolve().parent / "reference_pipeline.py"), "--npy", str(images),
                          "--weights", str(weights)], folder) for _ in range(3)]
    rows = []
    for case, times in (("simsearch extract: command to first image embedded (224 px, default settings)", first),
                        ("python -c 'import simsearch.cli, simsearch.stages.extract' (what extract imports)", imports),
                        ("python -c 'import torch, torchvision.models' (the floor: both pipelines pay it)", torch_imports),
                        ("reference pipeline: whole process for the same image", plain)):
        rows.append({"section": "startup", "case": case, "median_s": round(float(np.median(times)), 2),
                     "all_s": [round(t, 2) for t in times]})
    return rows


def bench_latency(store_size: int, requests: int, workdir: Path) -> list[Row]:
    """Single-query latency for a new image file: decode + embed + search, simsearch vs plain."""
    from PIL import Image
    from reference_pipeline import PlainImages, plain_model

    from simsearch.index import FaissSearcher, build_index
    from simsearch.model.query import QueryEncoder
    from simsearch.query import Query, answer
    from simsearch.store import Store

    vectors, labels = clustered_unit_vectors(store_size, 2048)
    items = [{"id": str(i), "index": i} for i in range(store_size)]
    store = create_store(workdir / "latency", vectors, labels, items,
                         {"data": {}, "model": {"name": "resnet50", "weights": "random", "image_size": 224,
                                                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                                "checkpoint": None, "seed": 0}})
    store = Store.open(store.dir)
    query = workdir / "query.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(query)
    encoder = QueryEncoder(store.manifest)
    index, _ = build_index(store, SCHEMA.index)
    searcher = FaissSearcher(index, "auto")
    from simsearch.pixels import decode_image

    def ours() -> None:
        answer(store, searcher, Query("image", "query", image=decode_image(query)), 10, lambda: encoder)

    model, transform = plain_model().to(encoder.device), PlainImages([query]).transform

    @torch.no_grad()
    def plain() -> None:
        image = transform(Image.open(query).convert("RGB"))[None].to(encoder.device)
        embedding = torch.nn.functional.normalize(model(image), dim=1).cpu().numpy()
        np.argsort(-(vectors @ embedding[0]))[:10]

    rows = []
    for name, function in (("simsearch", ours), ("plain", plain)):
        for _ in range(3):
            function()
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            function()
            times.append((time.perf_counter() - start) * 1000)
        rows.append({"section": "latency", "case": f"{name}: new image file, 224 px, store of {store_size}, "
                     f"{encoder.device}", "p50_ms": round(float(np.percentile(times, 50)), 1),
                     "p95_ms": round(float(np.percentile(times, 95)), 1), "requests": requests})
    return rows


def bench_memory(sizes: list[int], workdir: Path) -> list[Row]:
    """Peak RSS of a whole `simsearch extract` process: flat in the collection size (shards stream to disk)."""
    import subprocess

    rows = []
    script = Path(sys.executable).parent / "simsearch"
    for n in sizes:
        code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
                "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        command = [str(script), "extract", "data=synthetic", f"data.num_items={n}", "data.batch_size=128",
                   "model.weights=random", "model.image_size=32", "logger=none", f"run.dir={workdir / f'memory-{n}'}"]
        start = time.perf_counter()
        output = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, check=True)
        rows.append({"section": "memory", "case": f"simsearch extract, {n} synthetic items at 32 px",
                     "peak_rss_mb": round(int(output.stdout.strip()) / 1024, 1),
                     "seconds": round(time.perf_counter() - start, 1)})
    return rows


def vector_store_with_model(path: Path, size: int):
    """A store of clustered vectors whose manifest names a real model (random ResNet-50, 224 px)."""
    from simsearch.store import Store

    vectors, labels = clustered_unit_vectors(size, 2048)
    items = [{"id": str(i), "index": i} for i in range(size)]
    model = {"name": "resnet50", "weights": "random", "image_size": 224, "mean": [0.485, 0.456, 0.406],
             "std": [0.229, 0.224, 0.225], "checkpoint": None, "seed": 0}
    create_store(path, vectors, labels, items, {"data": {"classes": [str(c) for c in range(10)]}, "model": model})
    return Store.open(path), vectors


def bench_serve(store_size: int, requests: dict[str, int], workdir: Path) -> list[Row]:
    """p50/p95 latency and requests/s of the API on loopback, at 1, 8 and 32 concurrent clients."""
    import asyncio
    import io
    import threading

    import httpx
    import uvicorn
    from PIL import Image

    from simsearch.config import load_config
    from simsearch.server.app import create_app

    store, _ = vector_store_with_model(workdir / "serve", store_size)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(buffer, "JPEG")
    upload = buffer.getvalue()
    app = create_app(load_config([f"run.dir={store.dir}", "logger=none"]))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"

    async def load(kind: str, clients: int, count: int) -> tuple[list[float], int, float]:
        latencies: list[float] = []
        failures = 0
        remaining = [count]

        async def client_loop(client: httpx.AsyncClient) -> None:
            nonlocal failures
            while remaining[0] > 0:
                remaining[0] -= 1
                start = time.perf_counter()
                if kind == "item":
                    response = await client.get(f"{url}/search", params={"item": str(remaining[0] % store_size), "k": 10})
                else:
                    response = await client.post(f"{url}/search", files={"file": ("q.jpg", upload, "image/jpeg")})
                latencies.append((time.perf_counter() - start) * 1000)
                failures += response.status_code != 200

        async with httpx.AsyncClient(timeout=120) as client:
            started = time.perf_counter()
            await asyncio.gather(*(client_loop(client) for _ in range(clients)))
            return latencies, failures, time.perf_counter() - started

    rows = []
    try:
        for kind in ("item", "upload"):
            asyncio.run(load(kind, 1, 5))  # warm-up
            for clients in (1, 8, 32):
                latencies, failures, seconds = asyncio.run(load(kind, clients, requests[kind]))
                rows.append({"section": "serve", "case": f"{kind} query, {clients} clients, store of {store_size}",
                             "p50_ms": round(float(np.percentile(latencies, 50)), 1),
                             "p95_ms": round(float(np.percentile(latencies, 95)), 1),
                             "requests_per_s": round(len(latencies) / seconds, 1), "failed": failures,
                             "requests": len(latencies)})
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return rows


def bench_search_startup(store_size: int, repeats: int, workdir: Path) -> list[Row]:
    """Wall time of whole `simsearch search` processes by item and by vector (no torch, the index
    memory-mapped) against a process that only runs `import torch`, median of `repeats` each."""
    import statistics
    import subprocess

    vectors, labels = clustered_unit_vectors(store_size, 2048)
    data = {"name": "synthetic", "split": "test", "num_items": store_size, "num_classes": 10, "native_size_px": 32,
            "classes": [f"class_{c}" for c in range(10)]}  # grid tiles drawn from synthetic pixels, torch-free
    items = [{"id": str(i), "index": i} for i in range(store_size)]
    create_store(workdir / "startup", vectors, labels % 10, items, {"data": data, "model": {"seed": 0}})
    np.save(workdir / "query.npy", vectors[7])
    script = str(Path(sys.executable).parent / "simsearch")
    common = [f"run.dir={workdir / 'startup'}", "logger=none", "search.k=10"]
    commands = {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "simsearch search query=ID (first: builds index.faiss)": [script, "search", "query=42", *common],
        "simsearch search query=ID": [script, "search", "query=42", *common],
        "simsearch search query=VECTOR.npy": [script, "search", f"query={workdir / 'query.npy'}", *common],
    }
    seconds: dict[str, float] = {}
    for name, command in commands.items():
        times = []
        for _ in range(1 if "first" in name else repeats):
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)
    torch_seconds = seconds["python -c 'import torch'"]
    return [{"section": "search_startup", "command": name, "store": store_size, "median_s": round(value, 3),
             "vs_import_torch": f"{value / torch_seconds:.2f}x"} for name, value in seconds.items()]


def bench_incremental(count: int, workdir: Path) -> list[Row]:
    """Add one image to a folder of `count`: `simsearch extract` into the existing store (incremental)
    against a fresh extraction of the same folder (the plain way), same run, same arguments."""
    from PIL import Image

    folder = workdir / "incremental"
    rng = np.random.default_rng(0)
    for i in range(count):
        (folder / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"c{i % 4}" / f"{i:06d}.jpg")
    common = ["data=folder", f"data.root={folder}", "model.weights=random", "model.image_size=64",
              "data.batch_size=32", "data.num_workers=0"]
    simsearch_extract(common + [f"run.dir={workdir / 'inc-store'}"])
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / "c0" / "added.jpg")
    incremental_s, _ = timed(lambda: simsearch_extract(common + [f"run.dir={workdir / 'inc-store'}"]))
    fresh_s, _ = timed(lambda: simsearch_extract(common + [f"run.dir={workdir / 'inc-fresh'}"]))
    manifest = json.loads((workdir / "inc-store" / "manifest.json").read_text())
    return [{"section": "incremental", "case": f"1 image added to {count} (64 px, random weights, cpu)",
             "simsearch_s": round(incremental_s, 2), "fresh_extraction_s": round(fresh_s, 2),
             "ratio": round(fresh_s / incremental_s, 1), "embedded": manifest["embedded"], "reused": manifest["reused"]}]


THUMBNAIL_PROBE = """
import resource, sys, threading
from pathlib import Path
from PIL import Image
from simsearch.server.thumbnails import ThumbnailCache, thumbnail_bytes
from simsearch.pixels import decode_image
from simsearch.items import ItemImages
from simsearch.store import Store
store = Store.open(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cache = ThumbnailCache(ItemImages(store), 256)
# plain: what a server does without the cache: decode the whole image per request, then shrink it
work = (lambda: cache.png(0)) if sys.argv[2] == "simsearch" else \
    (lambda: thumbnail_bytes(decode_image(Path(store.manifest["data"]["root"]) / store.items[0]["path"]), 256))
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]; [t.join() for t in threads]
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def bench_thumbnails(side_px: int, workdir: Path) -> list[Row]:
    """Peak memory of 8 concurrent thumbnail requests for one side_px x side_px photo, each way in its own process."""
    import subprocess

    from PIL import Image

    rows = []
    for suffix in ("jpg", "png"):
        folder = workdir / f"thumbs-{suffix}" / "a"
        folder.mkdir(parents=True)
        pixels = np.random.default_rng(0).integers(0, 256, (side_px, side_px, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"big.{suffix}", **({"compress_level": 1} if suffix == "png" else {}))
        store_dir = workdir / f"thumbs-store-{suffix}"
        simsearch_extract(["data=folder", f"data.root={folder.parent}", "model.weights=random", "model.image_size=32",
                           "data.num_workers=0", f"run.dir={store_dir}"])
        peaks = {}
        for way in ("simsearch", "plain"):
            started = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", THUMBNAIL_PROBE, str(store_dir), way], capture_output=True,
                                 text=True, check=True).stdout
            peaks[way] = (float(out.strip().splitlines()[-1]), time.perf_counter() - started)
        rows.append({"section": "thumbnails", "case": f"8 concurrent requests, one {side_px} px {suffix.upper()}",
                     "simsearch_extra_peak_mb": round(peaks["simsearch"][0]), "plain_extra_peak_mb": round(peaks["plain"][0]),
                     "simsearch_s": round(peaks["simsearch"][1], 1), "plain_s": round(peaks["plain"][1], 1)})
    return rows


def fashion_mnist_or_smooth(count: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The first `count` Fashion-MNIST test images (Debian's idx files) with labels, else smooth grey noise."""
    from simsearch.pixels import FASHION_MNIST_FILES, read_idx

    root = Path("/usr/share/datasets/fashion-mnist")
    images_file, labels_file = FASHION_MNIST_FILES["test"]
    if (root / images_file).is_file():
        return read_idx(root / images_file)[:count], read_idx(root / labels_file)[:count].astype(int), "Fashion-MNIST"
    images = smooth_images(count).mean(axis=3).astype(np.uint8)
    return images, np.arange(count) % 10, "smooth noise (no dataset-fashion-mnist)"


def bench_formats(count: int, workdir: Path, per_shard: int = 1000) -> list[Row]:
    """The same `count` images as a folder of PNG files, a Hugging Face dataset (save_to_disk) and WebDataset
    shards: `simsearch extract` of each (raw pixels, so reading dominates), images/s, and whether every
    vector equals the folder's, matched by item (path = key column = sample key), never by position."""
    import io

    import datasets
    import webdataset
    from PIL import Image

    datasets.disable_progress_bars()
    images, labels, source = fashion_mnist_or_smooth(count)
    names, encoded = [], []
    folder = workdir / "formats-folder"
    for i, (image, label) in enumerate(zip(images, labels)):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        names.append(f"{label}/{i:06d}")
        encoded.append(buffer.getvalue())
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        (folder / f"{names[-1]}.png").write_bytes(encoded[-1])
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(c) for c in range(10)]),
                                  "name": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in encoded], "label": labels.tolist(),
                                "name": [f"{n}.png" for n in names]}, features=features).save_to_disk(workdir / "formats-hf")
    shards = workdir / "formats-shards"
    shards.mkdir()
    for number, start in enumerate(range(0, count, per_shard)):
        with webdataset.TarWriter(str(shards / f"s-{number:06d}.tar")) as sink:
            for i in range(start, min(start + per_shard, count)):
                sink.write({"__key__": names[i], "png": encoded[i], "cls": int(labels[i])})
    last = (count - 1) // per_shard
    common = ["model=pixels", "model.image_size=28", "data.num_workers=0", "data.batch_size=256", "trainer.accelerator=cpu"]
    ways = {"folder": ["data=folder", f"data.root={folder}"],
            "hf (save_to_disk)": ["data=hf", f"data.root={workdir / 'formats-hf'}", "data.key_column=name"],
            "webdataset": ["data=webdataset", f"data.urls={shards}/s-{{000000..{last:06d}}}.tar"]}
    vectors, rows, runs = {}, [], iter(range(10**6))

    def fresh_extraction(arguments: list[str]) -> np.ndarray:  # a new run.dir each time: nothing reused
        nonlocal run_dir
        run_dir = workdir / f"formats-run-{next(runs)}"
        return simsearch_extract(common + arguments + [f"run.dir={run_dir}"])

    run_dir = workdir
    for way, arguments in ways.items():
        seconds, embeddings = timed(lambda: fresh_extraction(arguments), repeat=2)  # the first run also warms up
        items = [json.loads(line) for line in (run_dir / "items.jsonl").read_text().splitlines()]
        ids = [item.get("sample", item["id"].removesuffix(".png")) for item in items]
        vectors[way] = dict(zip(ids, embeddings))
        rows.append({"section": "formats", "source": f"{count} {source} PNGs", "format": way, "seconds": round(seconds, 2),
                     "images_per_s": round(count / seconds), "items": len(items)})
    for row in rows:
        same = vectors[row["format"]].keys() == vectors["folder"].keys() and all(
            np.array_equal(vector, vectors["folder"][key]) for key, vector in vectors[row["format"]].items())
        row["vectors_equal_folder"] = same
    return rows


def bench_train_step(sizes: list[int], steps: int, batch: int = 128) -> list[Row]:
    """End-to-end fine-tuning speed: images/s of one training step as `simsearch finetune` takes it (Lite0, every
    stage trainable, class-balanced Fashion-MNIST batch from the data loader, augmentation, supcon, backward,
    AdamW), beside a plain loop over the same network and head on one fixed tensor (no data, no augmentation)."""
    from simsearch.config import load_config
    from simsearch.data import Resize, build_collection
    from simsearch.data.loading import augment
    from simsearch.model import Embedder, Preprocess, ProjectionHead, backbone_spec, build_backbone, resolve_model_config
    from simsearch.training import MetricLearningModule
    from simsearch.training.data import loaders, split_rows

    rows = []
    for px in sizes:
        cfg = load_config(["data=fashion_mnist", "data.num_workers=0", "data.split=train", "finetune.unfreeze=7",
                           "model.name=timm/tf_efficientnet_lite0", "model.weights=imagenet", f"model.image_size={px}",
                           "logger=none", f"finetune.batch_size={batch}"])
        cfg = OmegaConf.merge(cfg, {"model": resolve_model_config(cfg.model)})
        try:
            collection = build_collection(cfg.data, Resize(px, cfg.model.interpolation), 0)
        except Exception as error:  # noqa: BLE001 - no dataset-fashion-mnist: say so, measure the rest
            print(f"train_step skipped: {error}", file=sys.stderr)
            return rows
        spec = backbone_spec(cfg.model)
        backbone = build_backbone(spec, 0)
        embedder = Embedder(Preprocess.from_spec(spec.preprocessing), backbone.network, ProjectionHead(backbone.width, 512, 128))
        embedder.use_channels_last()
        module = MetricLearningModule(embedder, cfg.finetune, collection.classes, {})
        train_rows, val_rows = split_rows(len(collection.labels), 0.1, 0)
        loader, _ = loaders(cfg, collection.labels, train_rows, val_rows, None, collection)
        module.train()
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
        batches = iter(loader)

        def simsearch_step() -> None:
            data = next(batches)
            pixels = augment(data["pixels"], strong=False, crop_scale=cfg.finetune.crop_scale)
            loss = module.loss_fn(module.embedder(pixels), data["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        fixed = torch.rand(batch, 3, px, px).contiguous(memory_format=torch.channels_last)
        labels = torch.arange(batch) % 8
        network, head = backbone.network, embedder.head

        def plain_step() -> None:
            features = network(fixed)
            loss = module.loss_fn(torch.nn.functional.normalize(head(features), dim=1), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        speeds = {}
        for name, step in (("simsearch", simsearch_step), ("plain", plain_step)):
            step(), step()  # warm-up
            seconds, _ = timed(lambda: [step() for _ in range(steps)])
            speeds[name] = batch * steps / seconds
        rows.append({"section": "train_step", "case": f"Lite0 end to end, batch {batch}, {px} px, {steps} steps, fp32 channels-last",
                     "simsearch_img_per_s": round(speeds["simsearch"]), "plain_img_per_s": round(speeds["plain"]),
                     "ratio": round(speeds["simsearch"] / speeds["plain"], 2)})
    return rows


SECTIONS = {"eval", "eval_sampled", "extract", "formats", "incremental", "index", "latency", "memory", "process", "search_startup",
            "serve", "startup", "thumbnails", "train_step"}


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
    parser.add_argument("--index-sizes", type=lambda t: [int(float(x)) for x in t.split(",")], default=None,
                        help="vector counts for the index section, e.g. 1e5,1e6 (default: 1e5,1e6; --quick: 1e4,1e5)")
    parser.add_argument("--process-images", type=int, default=480,
                        help="images of the whole-process comparison (default 480; --quick: 160, one round)")
    parser.add_argument("--process-rounds", type=int, default=2, help="whole-process runs of each pipeline, alternating")
    parser.add_argument("--index-dim", type=int, default=None, help="vector size for the index section (default 2048; --quick 256)")
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
        if "eval_sampled" in sections:  # CPU: 10^4 of 10^6 at d=256; GPU: 10^5 x 10^5 at d=2048
            on_gpu = torch.cuda.is_available()
            n, queries, dim = (100_000, 100_000, 2048) if on_gpu else (1_000_000, 10_000, 256)
            rows += bench_eval_sampled(n // 10 if arguments.quick else n, queries // 10 if arguments.quick else queries,
                                       dim, workdir)
        if "extract" in sections:
            on_gpu = torch.cuda.is_available()
            count = (20_000 if on_gpu else 512) if not arguments.quick else (2_048 if on_gpu else 96)
            rows += bench_extract(count, 224, workdir)
        if "process" in sections:
            rows += bench_whole_process(160 if arguments.quick else arguments.process_images,
                                        1 if arguments.quick else arguments.process_rounds, workdir)
        if "startup" in sections:
            rows += bench_startup(workdir)
        if "latency" in sections:
            rows += bench_latency(10_000, 30 if arguments.quick else 100, workdir)
        if "serve" in sections:
            rows += bench_serve(10_000, {"item": 200 if arguments.quick else 1000, "upload": 48 if arguments.quick else 200},
                                workdir)
        if "search_startup" in sections:
            rows += bench_search_startup(10_000 if arguments.quick else 100_000, 5, workdir)
        if "memory" in sections:
            rows += bench_memory([2_000, 20_000] if arguments.quick else [10_000, 100_000], workdir)
        if "incremental" in sections:
            rows += bench_incremental(400 if arguments.quick else 4_000, workdir)
        if "formats" in sections:
            rows += bench_formats(500 if arguments.quick else 10_000, workdir)
        if "train_step" in sections:
            rows += bench_train_step([32] if arguments.quick else [32, 48, 64], steps=5 if arguments.quick else 10)
        if "thumbnails" in sections:
            rows += bench_thumbnails(4_000 if arguments.quick else 9_000, workdir)
        if "index" in sections:
            sizes = arguments.index_sizes or ([10_000, 100_000] if arguments.quick else [100_000, 1_000_000])
            rows += bench_index(sizes, arguments.index_dim or (256 if arguments.quick else 2048), workdir)
    print_table(rows)
    result = {"hardware": hardware(), "versions": library_versions(), "quick": arguments.quick,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "peak_rss_mb": round(peak_rss_mb(), 1), "rows": rows}
    if torch.cuda.is_available():
        result["gpu_peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    arguments.out.mkdir(parents=True, exist_ok=True)
    path = arguments.out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
