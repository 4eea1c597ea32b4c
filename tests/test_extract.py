"""Extraction through the `simsearch extract` entry point: synthetic, folders, weights, datasets, DDP."""

import gzip
import json
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import resnet50

from simsearch.files import read_jsonl
from simsearch.store import Store
from tests.helpers import FASHION_MNIST, TINY, simsearch, simsearch_subprocess, write_cifar10


def assert_unit_norm(embeddings: np.ndarray) -> None:
    np.testing.assert_allclose(np.linalg.norm(embeddings.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_synthetic_end_to_end(tmp_path):
    assert simsearch("extract", "data=synthetic", "data.num_items=10", "data.batch_size=4", *TINY, "run.dir=out") == 0
    store = Store.open(tmp_path / "out", verify=True)
    assert store.embeddings.shape == (10, 2048) and store.embeddings.dtype == np.float32
    assert_unit_norm(store.embeddings)
    assert store.labels.tolist() == [i % 4 for i in range(10)]
    assert [item["index"] for item in store.items] == list(range(10))
    manifest = store.manifest
    assert (manifest["count"], manifest["dim"], manifest["weights"], manifest["image_size"]) == (10, 2048, "random", 32)
    assert {"torch", "torchvision", "lightning"} <= set(manifest["versions"])
    assert set(manifest["sha256"]) == {"embeddings.npy", "labels.npy", "items.jsonl", "skipped.jsonl", "config.yaml"}
    assert (tmp_path / "out" / "config.yaml").read_text().count("image_size: 32") == 1
    assert not (tmp_path / "out" / "shards").exists()


def test_random_weights_are_seeded_and_float16_is_selectable(tmp_path):
    common = ("data=synthetic", "data.num_items=6", *TINY)
    assert simsearch("extract", *common, "run.dir=a") == 0
    assert simsearch("extract", *common, "run.dir=b", "store.dtype=float16") == 0
    assert simsearch("extract", *common, "run.dir=c", "run.seed=1") == 0
    a, b, c = (np.load(tmp_path / d / "embeddings.npy") for d in "abc")
    assert b.dtype == np.float16 and np.abs(a - b.astype(np.float32)).max() < 2e-3
    assert np.abs(a - c).max() > 1e-3  # another seed, another network


def test_store_checksum_detects_tampering(tmp_path):
    assert simsearch("extract", "data=synthetic", "data.num_items=4", *TINY, "run.dir=out") == 0
    np.save(tmp_path / "out" / "labels.npy", np.zeros(4, dtype=np.int64))
    with pytest.raises(Exception, match="checksum"):
        Store.open(tmp_path / "out", verify=True)


def write_odd_folder(root: Path) -> set[str]:
    """Images in many modes and suffixes, plus broken files; returns the relative paths that are broken."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    (root / "cats" / "deep").mkdir(parents=True)
    (root / "dogs").mkdir()
    Image.fromarray(rgb).save(root / "cats" / "a.jpg")
    Image.fromarray(rgb).save(root / "cats" / "B.JPG")
    Image.fromarray(rgb).convert("RGBA").save(root / "cats" / "rgba.png")
    Image.fromarray(rgb).convert("P").save(root / "cats" / "deep" / "palette.gif")
    Image.fromarray(rgb).convert("CMYK").save(root / "dogs" / "cmyk.jpeg")
    Image.fromarray(rgb[..., 0]).save(root / "dogs" / "grey.bmp")
    Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16)).save(root / "dogs" / "sixteen.png")
    Image.fromarray(rgb).save(root / "dogs" / "photo.TIFF")
    Image.fromarray(rgb).save(root / "top_level.webp")  # no class folder: label -1
    (root / "dogs" / "notes.txt").write_text("not an image and not an image suffix")
    (root / "dogs" / "corrupt.jpg").write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    (root / "dogs" / "empty.png").write_bytes(b"")
    Image.fromarray(rgb).save(root / "cats" / "full.png")
    (root / "cats" / "truncated.png").write_bytes((root / "cats" / "full.png").read_bytes()[:300])
    return {"dogs/corrupt.jpg", "dogs/empty.png", "cats/truncated.png"}


def test_folder_with_bad_and_odd_mode_files(tmp_path, caplog):
    broken = write_odd_folder(tmp_path / "images")
    code = simsearch("extract", "data=folder", f"data.root={tmp_path / 'images'}", "data.batch_size=3", *TINY, "run.dir=out")
    assert code == 0
    store = Store.open(tmp_path / "out", verify=True)
    paths = [item["path"] for item in store.items]
    assert len(paths) == 10 and not set(paths) & broken and "dogs/notes.txt" not in paths
    assert paths == sorted(paths)
    assert store.classes == ["cats", "dogs"]
    labels = dict(zip(paths, store.labels.tolist()))
    assert labels["cats/deep/palette.gif"] == 0 and labels["dogs/sixteen.png"] == 1 and labels["top_level.webp"] == -1
    assert_unit_norm(store.embeddings)
    skipped = read_jsonl(tmp_path / "out" / "skipped.jsonl")
    assert {s["path"] for s in skipped} == broken | {"dogs/notes.txt"} and all(s["reason"] for s in skipped)
    assert store.manifest["skipped"] == 4  # notes.txt: "not an image format simsearch reads"
    assert "4 of 14 inputs could not be read" in caplog.text


def test_sixteen_bit_and_rgba_are_converted_faithfully():
    from simsearch.pixels import to_rgb

    sixteen = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))
    assert np.asarray(to_rgb(sixteen))[0, 0].tolist() == [40000 >> 8] * 3
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(transparent))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.slow
@pytest.mark.parametrize("setup, message", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "no images under"),
    (lambda root: (root.mkdir(), (root / "x.jpg").write_bytes(b"junk")), "none of the 1 inputs"),
])
def test_unusable_folders_end_with_one_sentence(tmp_path, setup, message):
    setup(tmp_path / "images")
    result = simsearch_subprocess("extract", "data=folder", f"data.root={tmp_path / 'images'}", *TINY, "run.dir=out",
                                  cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def save_torchvision_state_dict(path: Path, seed: int = 3) -> dict:
    torch.manual_seed(seed)
    state = resnet50(weights=None).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


@pytest.mark.slow
def test_imagenet_weights_load_from_torchvision_cache(tmp_path):
    cached = tmp_path / "torch-home" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"  # IMAGENET1K_V2's file
    save_torchvision_state_dict(cached)
    common = ("data=synthetic", "data.num_items=4", *TINY)
    assert simsearch("extract", *common, "run.dir=cache", "model.weights=imagenet") == 0
    assert simsearch("extract", *common, "run.dir=path", f"model.weights={cached}") == 0
    assert simsearch("extract", *common, "run.dir=random") == 0
    cache, path, random = (np.load(tmp_path / d / "embeddings.npy") for d in ("cache", "path", "random"))
    np.testing.assert_array_equal(cache, path)
    assert np.abs(cache - random).max() > 1e-3


def test_missing_imagenet_weights_offline_say_where_to_put_them(monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    code = simsearch("extract", "data=synthetic", *TINY, "model.weights=imagenet_v1")
    error = capsys.readouterr().err
    assert code == 2 and "resnet50-0676ba61.pth" in error and "hub/checkpoints" in error


def test_wrong_state_dict_is_refused(tmp_path, capsys):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    assert simsearch("extract", "data=synthetic", *TINY, "model.weights=other.pth") == 2
    assert "not a torchvision resnet50 state dict" in capsys.readouterr().err


def test_cifar10_reader_on_batches_in_torchvision_format(tmp_path):
    test_images = write_cifar10(tmp_path / "cifar")
    assert simsearch("extract", "data=cifar10", f"data.root={tmp_path / 'cifar'}", "data.download=false", *TINY,
                     "run.dir=out") == 0
    store = Store.open(tmp_path / "out")
    assert len(store) == 6 and store.labels.tolist() == list(range(6))
    assert store.classes[:2] == ["airplane", "automobile"]
    from simsearch.items import ItemImages

    np.testing.assert_array_equal(np.asarray(ItemImages(store).image(2)), test_images[2])


@pytest.mark.slow
def test_missing_cifar10_offline_says_what_to_put_where(tmp_path):
    result = simsearch_subprocess("extract", "data=cifar10", f"data.root={tmp_path / 'nothing'}", "data.download=false",
                                  *TINY, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cifar-10-python.tar.gz" in result.stderr and str(tmp_path / "nothing") in result.stderr


def test_fashion_mnist_idx_reader_on_written_files(tmp_path):
    root = tmp_path / "fm"
    root.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    with gzip.open(root / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, 5, 28, 28) + images.tobytes())
    with gzip.open(root / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 8, 1, 5) + bytes([3, 1, 4, 1, 5]))
    assert simsearch("extract", "data=fashion_mnist", f"data.root={root}", *TINY, "run.dir=out") == 0
    store = Store.open(tmp_path / "out")
    assert store.labels.tolist() == [3, 1, 4, 1, 5] and store.label_name(0) == "Dress"


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist (CI installs it)")
def test_real_fashion_mnist_images(tmp_path):
    from simsearch.pixels import read_idx

    assert simsearch("extract", "data=fashion_mnist", "data.limit=300", "data.batch_size=100", *TINY, "run.dir=out") == 0
    store = Store.open(tmp_path / "out", verify=True)
    expected = read_idx(FASHION_MNIST / "t10k-labels-idx1-ubyte.gz")[:300]
    assert len(store) == 300 and store.labels.tolist() == expected.tolist()
    assert_unit_norm(store.embeddings)
    assert store.manifest["data"]["classes"][9] == "Ankle boot"


@pytest.mark.slow
def test_two_process_ddp_store_equals_single_process(tmp_path):
    # 11 items over 2 ranks in batches of 2: uneven shards, and the sampler pads with a duplicate.
    common = ("data=synthetic", "data.num_items=11", "data.batch_size=2", *TINY)
    single = simsearch_subprocess("extract", *common, "run.dir=one", cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    ddp = simsearch_subprocess("extract", *common, "run.dir=two", "trainer.devices=2", "trainer.strategy=ddp",
                               cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr
    one, two = Store.open(tmp_path / "one"), Store.open(tmp_path / "two", verify=True)
    assert len(two) == 11 and two.items == one.items
    np.testing.assert_allclose(two.embeddings, one.embeddings, atol=1e-5)
    np.testing.assert_array_equal(two.labels, one.labels)


def test_python_dash_m_entry_point(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "simsearch", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "extract" in result.stdout


@pytest.mark.slow
def test_killed_extraction_resumes_to_the_same_store(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    common = ["data=synthetic", "data.num_items=240", "data.batch_size=8", *TINY]
    assert simsearch("extract", *common, "run.dir=whole") == 0
    script = Path(sys.executable).parent / "simsearch"
    process = subprocess.Popen([str(script), "extract", *common, "run.dir=killed"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shards = tmp_path / "killed" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("*.safetensors"))) < 4:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)  # as a preempted job dies: no clean-up runs
    process.wait()
    written = sorted(shards.glob("*.safetensors"))
    assert 4 <= len(written) < 30, "the run must be killed mid-way"
    assert not (tmp_path / "killed" / "manifest.json").exists()
    # a half-written shard under a final name, and a temp file, as a crash mid-write leaves them
    written[-1].write_bytes(written[-1].read_bytes()[:200])
    (shards / "attempt000-rank0000-batch99999999.tmp").write_bytes(b"partial")
    result = simsearch_subprocess("-v", "extract", *common, "run.dir=killed", cwd=tmp_path)  # -v: INFO lines
    assert result.returncode == 0, result.stderr
    assert "resuming:" in result.stderr and "ignoring the incomplete shard" in result.stderr
    whole, resumed = Store.open(tmp_path / "whole"), Store.open(tmp_path / "killed", verify=True)
    assert resumed.items == whole.items
    np.testing.assert_allclose(resumed.embeddings, whole.embeddings, atol=1e-6)
    assert not shards.exists()


def test_shards_of_another_config_are_not_merged(tmp_path):
    from simsearch.extraction.shards import complete_shards

    common = ["data=synthetic", "data.num_items=16", "data.batch_size=8", *TINY]
    assert simsearch("extract", *common, "run.dir=out") == 0
    shard_dir = tmp_path / "out" / "shards"
    shard_dir.mkdir()
    from safetensors.torch import save_file

    save_file({"index": torch.arange(8), "valid": torch.ones(8, dtype=torch.uint8), "embeddings": torch.zeros(8, 2048)},
              str(shard_dir / "attempt000-rank0000-batch00000000.safetensors"), metadata={"fingerprint": "other", "reasons": "{}"})
    assert complete_shards(shard_dir, "mine") == []
    assert simsearch("extract", *common, "run.dir=out", "run.seed=1") == 0
    assert_unit_norm(Store.open(tmp_path / "out").embeddings)  # the zero vectors of the foreign shard were not used


@pytest.mark.slow
def test_fully_resumed_ddp_extraction_is_merged_once(tmp_path):
    """Every item already in a shard: under DDP only global rank 0 merges, and every rank gets its manifest."""
    from safetensors.torch import save_file

    from simsearch.config import load_config
    from simsearch.data import DATASETS
    from simsearch.extraction.shards import shard_fingerprint
    from simsearch.identity import run_fingerprint
    from simsearch.model import resolve_model_config

    common = ["data=synthetic", "data.num_items=11", "data.batch_size=4", *TINY]
    assert simsearch("extract", *common, "run.dir=one") == 0
    one = Store.open(tmp_path / "one")
    cfg = load_config([*common, "run.dir=two"])
    cfg.model = resolve_model_config(cfg.model)
    fingerprint = run_fingerprint(cfg, one.manifest["embedder"], None, DATASETS["synthetic"])
    shards = tmp_path / "two" / "shards"
    shards.mkdir(parents=True)
    for batch, start in enumerate(range(0, 11, 4)):  # the shards a killed run left, complete
        rows = torch.arange(start, min(start + 4, 11))
        save_file({"index": rows, "valid": torch.ones(len(rows), dtype=torch.uint8),
                   "embeddings": torch.from_numpy(one.embeddings[rows.numpy()])},
                  str(shards / f"attempt000-rank0000-batch{batch:08d}.safetensors"),
                  metadata={"fingerprint": shard_fingerprint(fingerprint), "reasons": "{}",
                            "keys": json.dumps([one.items[i]["key"] for i in rows.tolist()])})
    ddp = simsearch_subprocess("-v", "extract", *common, "run.dir=two", "trainer.devices=2", "trainer.strategy=ddp",
                               cwd=tmp_path)
    assert ddp.returncode == 0, ddp.stderr
    assert "every item is already embedded" in ddp.stderr
    assert ddp.stdout.count("store of 11 items") == 1  # one merge, by rank 0
    two = Store.open(tmp_path / "two", verify=True)
    assert two.items == one.items
    np.testing.assert_allclose(two.embeddings, one.embeddings, atol=1e-6)
