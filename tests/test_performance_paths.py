"""The fast paths agree with the plain ones: batched device preprocessing, and the reference pipeline."""

import sys
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from simsearch.model import Preprocess, backbone_spec, build_backbone
from tests.helpers import TINY, simsearch, write_cifar10

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def test_batched_preprocessing_equals_per_image_cpu_transforms():
    pixels = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    batched = Preprocess(96, MEAN, STD)(pixels)
    # one image at a time: resized in float, antialiased, rounded back to 8 bits (simsearch's one resize rule:
    # a file resized in the loader and a dataset item resized on the device must give the same pixels)
    resize = v2.Compose([v2.ToDtype(torch.float32, scale=False), v2.Resize((96, 96), antialias=True)])
    normalise = v2.Normalize(MEAN, STD)
    expected = torch.stack([normalise(resize(image).round().clamp(0, 255) / 255) for image in pixels])
    torch.testing.assert_close(batched, expected, atol=1e-4, rtol=1e-4)


def test_reference_pipeline_and_simsearch_agree_on_embeddings(tmp_path):
    from reference_pipeline import plain_embed, plain_model

    images = write_cifar10(tmp_path / "cifar", per_batch=8)
    state = build_backbone(backbone_spec({"name": "resnet50", "weights": "random"}), 0).network.state_dict()
    torch.save(state, tmp_path / "weights.pth")
    assert simsearch("extract", "data=cifar10", f"data.root={tmp_path / 'cifar'}", "data.download=false", *TINY,
                     f"model.weights={tmp_path / 'weights.pth'}", "model.image_size=64", "run.dir=out") == 0
    ours = np.load(tmp_path / "out" / "embeddings.npy")
    reference = plain_model({**state, "fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    plain = plain_embed(reference, images, image_size=64, workers=0)
    cosine = np.sum(ours * plain, axis=1)
    assert cosine.min() > 0.999, cosine


def test_jpeg_decoding_on_the_device_matches_the_loader_path(tmp_path):
    from PIL import Image

    from simsearch.files import read_jsonl
    from simsearch.store import Store

    root = tmp_path / "jpegs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        Image.fromarray(small).resize((80, 60), Image.BILINEAR).save(root / f"{i}.jpg", quality=95)
    Image.fromarray(small).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(small).save(root / "png-in-disguise.jpg", format="PNG")
    (root / "corrupt.jpg").write_bytes((root / "0.jpg").read_bytes()[:400] + b"\x00" * 50)
    common = ("data=folder", f"data.root={root}", "data.labels=none", *TINY, "model.name=resnet18", "model.image_size=64")
    assert simsearch("extract", *common, "data.decode=loader", "run.dir=loader") == 0
    assert simsearch("extract", *common, "data.decode=device", "run.dir=device") == 0
    loader, device = Store.open(tmp_path / "loader"), Store.open(tmp_path / "device")
    shared = sorted({i["id"] for i in loader.items} & {i["id"] for i in device.items})
    assert {"0.jpg", "5.jpg", "cmyk.jpg"} <= set(shared)
    a = loader.embeddings[[loader.row_of(i) for i in shared]]
    b = device.embeddings[[device.row_of(i) for i in shared]]
    assert np.sum(a * b, axis=1).min() > 0.999
    skipped = {s["path"]: s["reason"] for s in read_jsonl(tmp_path / "device" / "skipped.jsonl")}
    assert "png-in-disguise.jpg" in skipped
