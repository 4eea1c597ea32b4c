"""Fused CPU inference (`model.inference`): the frozen backbone gives the eager one's embeddings, through
`simsearch extract` and directly, for ResNet-50 and EfficientNet-Lite0; backbones that cannot be frozen
run eagerly, with the reason logged; the CPU default is fp32, recorded in the manifest."""

import logging

import numpy as np
import pytest
import torch
from torch import nn

from simsearch.config import load_config
from simsearch.model import Embedder, Preprocess, build_embedder
from simsearch.model.inference import FrozenNetwork, prepare_inference
from simsearch.store import Store
from tests.helpers import TINY, simsearch

FAMILIES = {"resnet50": ("model.image_size=64",), "efficientnet-lite0": ("model=efficientnet_lite0", "model.weights=random")}
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a.astype(np.float64) * b, axis=1).min())


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_extract_frozen_equals_eager(tmp_path, caplog, family):
    common = ("extract", "data=synthetic", "data.num_items=6", "data.batch_size=4", *TINY, *FAMILIES[family])
    runs = {"eager": ("model.inference=eager", "trainer.precision=32-true"),
            "frozen-fp32": ("model.inference=frozen", "trainer.precision=32-true"),
            "frozen-bf16": ("model.inference=frozen", "trainer.precision=bf16-mixed"),
            "default": ()}
    caplog.set_level(logging.INFO, logger="simsearch.model.inference")
    logs = {}
    for name, arguments in runs.items():
        caplog.clear()
        assert simsearch(*common, *arguments, f"run.dir={name}") == 0
        logs[name] = caplog.text
    eager, fp32, bf16, default = (np.load(tmp_path / name / "embeddings.npy") for name in runs)
    assert "frozen TorchScript" not in logs["eager"]
    assert "frozen TorchScript backbone" in logs["frozen-fp32"] and "float32" in logs["frozen-fp32"]
    assert "bfloat16" in logs["frozen-bf16"]
    assert min_cosine(fp32, eager) > 0.9999
    assert min_cosine(bf16, eager) > 0.999
    # the default on a CPU: frozen, in fp32 (bf16 misses the 0.999 cosine a store needs on real images)
    assert "float32" in logs["default"]
    np.testing.assert_array_equal(default, fp32)
    recorded = {name: Store.open(tmp_path / name).manifest["embedder"] for name in runs}
    assert recorded["default"]["precision"] == "32-true" and recorded["default"]["inference"] == "frozen"
    assert recorded["eager"]["inference"] == "eager" and recorded["frozen-bf16"]["precision"] == "bf16-mixed"


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_embedder_equals_eager_on_other_batch_sizes(family):
    cfg = load_config([*TINY, *FAMILIES[family]])
    eager = build_embedder(cfg.model, 0).eval()
    fused = build_embedder(cfg.model, 0).eval()
    assert prepare_inference(fused, "frozen", "32-true", True, on_gpu=False) == ("32-true", "frozen")
    assert isinstance(fused.backbone, FrozenNetwork)
    for batch in (1, 5):  # traced on one image: no batch size may be baked in
        pixels = torch.randint(0, 256, (batch, 3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected, got = eager(pixels).numpy(), fused.use_channels_last()(pixels).numpy()
        assert got.dtype == np.float32 and min_cosine(got, expected) > 0.9999


class Untraceable(nn.Module):
    """Returns a string beside its features: torch.jit.trace refuses the output."""

    def forward(self, images: torch.Tensor):
        return images.mean(dim=(2, 3)), "not a tensor"


class BakedBatchSize(nn.Module):
    """Traces without error, but `view(1, -1)` bakes the trace's batch size of one into the graph."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.mean(dim=(2, 3)).view(1, -1)[:, :3] if images.shape[0] == 1 else images.mean(dim=(2, 3))


@pytest.mark.parametrize("backbone, reason", [(Untraceable(), "could not be traced"),
                                              (BakedBatchSize(), "frozen copy gave other embeddings")])
def test_a_backbone_that_cannot_be_frozen_runs_eagerly_with_the_reason(caplog, backbone, reason):
    caplog.set_level(logging.INFO, logger="simsearch.model.inference")
    embedder = Embedder(Preprocess(32, MEAN, STD), backbone)
    assert prepare_inference(embedder, "auto", "32-true", True, on_gpu=False) == ("32-true", "eager")
    assert embedder.backbone is backbone
    assert "runs eagerly" in caplog.text and reason in caplog.text
    # simsearch's own choice (model.inference=auto) is logged, not warned: a user cannot act on it
    assert all(record.levelno < logging.WARNING for record in caplog.records)


def test_eager_mode_and_precision_defaults():
    embedder = Embedder(Preprocess(32, MEAN, STD), nn.Conv2d(3, 4, 3))
    assert prepare_inference(embedder, "eager", None, True, on_gpu=False) == ("32-true", "eager")
    assert prepare_inference(embedder, "eager", "bf16-mixed", True, on_gpu=False) == ("bf16-mixed", "eager")
    assert prepare_inference(embedder, "auto", None, True, on_gpu=True) == ("bf16-mixed", "eager")
    assert isinstance(embedder.backbone, nn.Conv2d)


def test_unknown_inference_mode_is_one_sentence(capsys):
    assert simsearch("extract", "data=synthetic", "data.num_items=2", *TINY, "model.inference=fast", "run.dir=out") == 2
    error = capsys.readouterr().err
    assert "model.inference must be auto, frozen, eager, not 'fast'" in error and "Traceback" not in error
