"""simsearch installed as a package (not editable, not from its source folder) finds its presets and runs."""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_non_editable_install_runs_from_another_folder(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch, ...) come from this environment's site-packages, simsearch itself does not:
    # a path added by a .pth file is not a site folder, so this environment's editable install is not seen
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT / "simsearch", source / "simsearch", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"  # a wheel built from the source, as `pip install .` builds one
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(wheels.glob("simsearch-*.whl"))
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--quiet", str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SIMSEARCH_CONFIGS")}
    where = subprocess.run([str(python), "-c", "import simsearch; print(simsearch.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.startswith(site), where.stdout + where.stderr  # the installed copy, not the source folder
    script = venv / "bin" / "simsearch"
    config = subprocess.run([str(script), "config", "data=synthetic"], cwd=elsewhere, env=env, capture_output=True,
                            text=True, timeout=300)
    assert config.returncode == 0 and "name: synthetic" in config.stdout, config.stderr
    extract = subprocess.run([str(script), "extract", "data=synthetic", "data.num_items=8", "model.weights=random",
                              "model.image_size=32", "logger=none", "trainer.enable_progress_bar=false", "data.num_workers=0",
                              "run.dir=out"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert extract.returncode == 0, extract.stderr[-2000:]
    assert (elsewhere / "out" / "manifest.json").is_file()
