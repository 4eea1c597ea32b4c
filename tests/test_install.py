"""simsearch as a wheel built from these sources: it carries every module and every file of configs/ (one source:
setup.py maps the top-level folder into the package), and installed (not editable, not from its source folder)
it finds its presets and experiments from any folder."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("simsearch", "configs", "pyproject.toml", "setup.py", "README.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` of a copy of the sources (building writes build/ and *.egg-info beside them), offline: this
    environment's setuptools, no isolated build environment to download."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", str(tmp / "wheels"), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    return next((tmp / "wheels").glob("simsearch-*.whl"))


def test_the_wheel_carries_every_module_and_every_file_of_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = [path.relative_to(ROOT) for path in (ROOT / "configs").rglob("*") if path.is_file()]
    assert len(configs) >= 30  # the folder is there and full
    assert {f"simsearch/{path}" for path in configs} <= names, sorted({f"simsearch/{p}" for p in configs} - names)
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "simsearch").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert {"simsearch/web/index.html", "simsearch/web/app.js", "simsearch/web/app.css"} <= names
    assert not any(name.startswith("configs/") for name in names)  # inside the package, never a top-level folder


@pytest.mark.slow
def test_a_non_editable_install_runs_from_another_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # the dependencies (torch, ...) come from this environment's site-packages, simsearch itself does not:
    # a path added by a .pth file is not a site folder, so this environment's editable install is not seen
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SIMSEARCH_CONFIGS")}
    where = subprocess.run([str(python), "-c", "import simsearch.config as c; print(c.__file__); print(c.config_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    module, configs = where.stdout.split()
    assert module.startswith(site) and configs == str(Path(site) / "simsearch" / "configs"), where.stdout + where.stderr
    script = venv / "bin" / "simsearch"
    for arguments, shown in ((["data=synthetic"], "name: synthetic"), (["experiment=demo"], "dir: outputs/demo"),
                             (["experiment=finetune_e2e"], "unfreeze: 7"), (["index=milvus"], "backend: milvus")):
        config = subprocess.run([str(script), "config", *arguments], cwd=elsewhere, env=env, capture_output=True,
                                text=True, timeout=300)
        assert config.returncode == 0 and shown in config.stdout, (arguments, config.stderr)
    extract = subprocess.run([str(script), "extract", "data=synthetic", "data.num_items=8", "model.weights=random",
                              "model.image_size=32", "logger=none", "trainer.enable_progress_bar=false", "data.num_workers=0",
                              "run.dir=out"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert extract.returncode == 0, extract.stderr[-2000:]
    assert (elsewhere / "out" / "manifest.json").is_file()
