"""The GPU record's dry run (scripts/gpu_record.sh OUT --dry-run): every section runs on the CPU with tiny sizes,
so a section broken by a change shows here, not in the few minutes a GPU machine is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("setup", "extract", "jpeg", "eval", "query", "finetune")


def numbers(value, path=""):
    """Every int/float in a JSON value, with its path (booleans are not numbers here)."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from numbers(item, f"{path}[{index}]")


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "record"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_RECORD_SITE": str(tmp_path / "site"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_record.sh"), str(out), "--dry-run",
                             "--work-dir", str(tmp_path / "work")],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((out / "gpu-cpu-dry-run.json").read_text())
    assert (out / "gpu_record.log").stat().st_size > 0
    assert record["device"] == "cpu-dry-run" and record["dry_run"] is True
    for key in ("extract_img_per_s", "ratio_vs_reference", "query_p50_ms", "query_p99_ms", "finetune_test_p10"):
        assert isinstance(record[key], (int, float)) and record[key] > 0, key
    assert list(record["sections"]) == list(SECTIONS)
    for name, section in record["sections"].items():
        assert section["status"] == "ok", (name, section.get("error_tail"))
    sections = record["sections"]
    assert sections["extract"]["reference"]["img_per_s"] > 0
    assert {"default", "best"} <= set(sections["extract"])
    assert {"device", "loader"} <= set(sections["jpeg"])
    assert sections["eval"]["max_metric_difference"] < 1e-6  # the two paths agree on every metric of the sample
    assert sections["eval"]["gpu_full"]["queries"] == sections["eval"]["items"]
    assert sections["query"]["cpu_faiss"]["same_top10_as_gpu"] is True
    assert 0 <= sections["finetune"]["test_p10"] <= 1
    negative = [(path, value) for path, value in numbers(record) if value < 0]
    assert not negative, negative
    timings = [value for path, value in numbers(record) if path.endswith(("_s", "img_per_s", "_ms"))]
    assert timings and all(value > 0 for value in timings), [p for p, v in numbers(record) if v == 0 and p.endswith("_s")]
    assert not (tmp_path / "work").exists()  # the scratch folder is removed


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_record", ROOT / "scripts" / "gpu_record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steady_rate_subtracts_the_fixed_cost():
    gpu_record = load_script()
    rate, fixed = gpu_record.steady_rate(10_256, 12.0, 256, 10.0)  # 10,000 more images in 2 more seconds
    assert rate == pytest.approx(5000) and fixed == pytest.approx(10.0 - 256 / 5000)
    assert gpu_record.steady_rate(1000, 5.0, 256, 6.0) == (None, None)  # noise larger than the work: no rate


def test_gpu_sampler_reads_nvidia_smi(tmp_path, monkeypatch):
    """The utilisation sampler against a stand-in nvidia-smi that prints one value per line, as the real one does."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nfor u in 0 80 90 85 0; do echo $u; sleep 0.05; done; sleep 5\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    gpu_record = load_script()
    with gpu_record.GpuSampler(True) as sampler:
        import time

        time.sleep(0.6)
    summary = sampler.summary(items=1000)
    assert summary["samples"] == 5 and summary["max_util_pct"] == 90
    assert summary["busy_mean_util_pct"] == pytest.approx(85) and summary["img_per_s_gpu_busy"] > 0


@pytest.mark.slow
def test_no_gpu_no_record(tmp_path):
    """Without --dry-run on a machine whose torch sees no GPU, nothing is measured and no JSON is written."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_record.py"), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no GPU" in result.stdout
    assert not list((tmp_path / "out").glob("gpu-*.json"))
