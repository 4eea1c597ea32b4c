"""One preparation for every image simsearch embeds, stored or queried: EXIF rotation, `to_rgb`
(transparency over white, 16-bit scaled), the one resize rule. An RGBA image with transparent pixels, a
16-bit grey image and a CMYK JPEG give the same vector as a stored item of a folder and as a query, by
every way a query arrives (a file, a PIL image, the query encoder), and on every decoding path here."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import simsearch
from simsearch.pixels import prepare_image
from simsearch.store import Store
from tests.helpers import simsearch as cli

# raw pixels at 16 x 16: the most literal vector, so any difference in preparation shows
QUIET = ["logger=none", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "data.num_workers=0"]
PIXELS = ["model=pixels", "model.image_size=16", *QUIET]


def rgba_image() -> Image.Image:
    """Red on the left; on the right transparent pixels whose colour channels are black (white when composited)."""
    pixels = np.zeros((24, 24, 4), np.uint8)
    pixels[:, :12] = (200, 30, 30, 255)
    pixels[:, 12:, 3] = 0
    pixels[6:18, 14:22] = (30, 30, 200, 128)  # half transparent blue
    return Image.fromarray(pixels)  # (H, W, 4) uint8: RGBA


def grey16_image() -> Image.Image:
    """16-bit grey: 40000 (156 in 8 bits: 40000 >> 8) above, 10000 (39) below, a ramp on the right."""
    values = np.full((20, 20), 40000, np.uint16)
    values[10:] = 10000
    values[:, 15:] = np.linspace(0, 65535, 20, dtype=np.uint16)[:, None]
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    return image


def cmyk_image() -> Image.Image:
    gradient = np.linspace(0, 255, 24, dtype=np.uint8)
    pixels = np.stack([np.tile(gradient, (24, 1)), np.tile(gradient[:, None], (1, 24)), np.full((24, 24), 60, np.uint8),
                       np.full((24, 24), 20, np.uint8)], axis=-1)
    return Image.frombytes("CMYK", (24, 24), pixels.tobytes())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preparation") / "images"
    (root / "odd").mkdir(parents=True)
    rgba_image().save(root / "odd" / "rgba.png")
    grey16_image().save(root / "odd" / "grey16.png")
    cmyk_image().save(root / "odd" / "cmyk.jpg", quality=95)
    rgb = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "odd" / "rgb.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def store_dir(folder) -> Path:
    assert cli("extract", "data=folder", f"data.root={folder}", *PIXELS, f"run.dir={folder.parent / 'store'}") == 0
    return folder.parent / "store"


def stored(store: Store, item_id: str) -> np.ndarray:
    return store.vectors(np.array([store.row_of(item_id)]))[0]


def test_the_files_keep_the_modes_under_test(folder):
    modes = {path.name: Image.open(path).mode for path in (folder / "odd").iterdir()}
    assert modes["rgba.png"] == "RGBA" and modes["grey16.png"].startswith("I") and modes["cmyk.jpg"] == "CMYK"


def test_preparation_composites_over_white_and_scales_16_bits():
    grey = np.asarray(prepare_image(grey16_image()))
    assert grey.shape == (20, 20, 3) and grey[0, 0].tolist() == [156, 156, 156] and grey[19, 0].tolist() == [39, 39, 39]
    rgba = np.asarray(prepare_image(rgba_image()))
    assert rgba[0, 0].tolist() == [200, 30, 30] and rgba[0, 23].tolist() == [255, 255, 255]
    assert rgba[10, 16].tolist() == [142, 142, 227]  # c * 128/255 + 255 * 127/255, rounded
    upright = Image.new("RGB", (4, 4))
    assert prepare_image(upright) is upright  # prepared already: as it is


def test_an_exif_rotated_photo_is_upright_as_a_query():
    wide = Image.fromarray(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3))
    exif = wide.getexif()
    exif[0x0112] = 6  # stored sideways: shown rotated 90 degrees clockwise
    wide.info["exif"] = exif.tobytes()
    assert prepare_image(wide).size == (4, 6)


@pytest.mark.parametrize("item_id, make", [("odd/rgba.png", rgba_image), ("odd/grey16.png", grey16_image)])
def test_the_query_encoder_prepares_a_pil_image_as_the_store_did(store_dir, item_id, make):
    from simsearch.model.query import QueryEncoder

    store = Store.open(store_dir)
    vector = QueryEncoder(store.manifest, "cpu").encode([make()])[0]
    assert float(vector @ stored(store, item_id)) >= 0.9999


@pytest.mark.parametrize("name", ["rgba.png", "grey16.png", "cmyk.jpg", "rgb.jpg"])
def test_a_file_as_a_query_finds_its_stored_item(store_dir, folder, name):
    store = simsearch.open(store_dir)
    first = store.search(folder / "odd" / name, k=1)[0]
    assert first.id == f"odd/{name}" and first.score >= 0.9999


def test_a_cmyk_jpeg_opened_by_the_user_finds_its_stored_item(store_dir, folder):
    first = simsearch.open(store_dir).search(Image.open(folder / "odd" / "cmyk.jpg"), k=1)[0]
    assert first.id == "odd/cmyk.jpg" and first.score >= 0.9999


@pytest.mark.parametrize("item_id, make", [("odd/rgba.png", rgba_image), ("odd/grey16.png", grey16_image)])
def test_a_pil_image_through_the_api_finds_its_stored_item(store_dir, item_id, make):
    first = simsearch.open(store_dir).search(make(), k=1)[0]
    assert first.id == item_id and first.score >= 0.9999


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=pytest.mark.skipif(
    not cuda_available(), reason="no GPU: nvJPEG's path is checked where there is one"))])
def test_jpegs_decoded_on_the_device_path_give_the_loaders_vectors(store_dir, folder, accelerator):
    """data.decode=device (torchvision's decoder: nvJPEG on a GPU, libjpeg on the CPU), then the same
    prepared_pixels, against PIL in the loader."""
    on_device = folder.parent / f"device-{accelerator}"
    assert cli("extract", "data=folder", f"data.root={folder}", "data.decode=device", *PIXELS,
               f"trainer.accelerator={accelerator}", f"run.dir={on_device}") == 0
    loader, device = Store.open(store_dir), Store.open(on_device)
    for item_id in ("odd/rgb.jpg", "odd/cmyk.jpg"):
        assert float(stored(loader, item_id) @ stored(device, item_id)) >= 0.9999, item_id
