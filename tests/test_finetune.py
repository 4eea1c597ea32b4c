"""Fine-tuning through `simsearch finetune` / `compare`, and each loss on synthetic clustered features."""

import gzip
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from simsearch.config import Config
from simsearch.model import Embedder, Preprocess, ProjectionHead
from simsearch.store import Store
from simsearch.training import MetricLearningModule
from tests.helpers import TINY, read_json, simsearch, simsearch_subprocess

SCHEMA = OmegaConf.structured(Config)
SMALL = (*TINY, "data=synthetic", "data.num_items=80", "data.num_classes=4", "finetune.batch_size=16",
         "finetune.m_per_class=4", "finetune.dim=16", "finetune.hidden_dim=32", "finetune.views=2",
         "finetune.val_fraction=0.25")


@pytest.mark.parametrize("loss, miner", [("triplet", "batch_hard"), ("triplet", "semi_hard"), ("supcon", "batch_hard"),
                                         ("ntxent", "batch_hard")])
def test_each_loss_lowers_on_clustered_features(loss, miner):
    torch.manual_seed(0)
    classes, per_class, dim = 4, 16, 2048
    centres = torch.randn(classes, dim)
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = centres[labels] + 3.0 * torch.randn(len(labels), dim)
    if loss == "ntxent":  # two views of each item: the item plus a little noise
        features = torch.stack([features + 0.5 * torch.randn_like(features) for _ in range(2)], dim=1)
    ft = OmegaConf.merge(SCHEMA.finetune, {"loss": loss, "miner": miner, "dim": 16, "hidden_dim": 64, "margin": 0.3})
    embedder = Embedder(Preprocess(32, [0.5] * 3, [0.5] * 3), torch.nn.Identity(), ProjectionHead(dim, 64, 16))
    module = MetricLearningModule(embedder, ft, [str(c) for c in range(classes)], {})
    module.log = lambda *args, **kwargs: None  # no Trainer attached in this unit test
    optimizer = torch.optim.Adam(module.embedder.head.parameters(), lr=1e-3)
    losses = []
    for _ in range(40):
        order = torch.randperm(len(labels))[:32]
        loss_value = module.training_step({"features": features[order], "label": labels[order]}, 0)
        optimizer.zero_grad()
        loss_value.backward()
        optimizer.step()
        losses.append(float(loss_value.detach()))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("loss, warned", [("triplet", True), ("supcon", False)])
def test_the_no_active_triplet_warning_is_for_triplet_losses_only(loss, warned, caplog):
    """SupCon (the default) still learns when every triplet meets the margin: no warning that it cannot."""
    ft = OmegaConf.merge(SCHEMA.finetune, {"loss": loss})
    embedder = Embedder(Preprocess(32, [0.5] * 3, [0.5] * 3), torch.nn.Identity(), ProjectionHead(8, 8, 4))
    module = MetricLearningModule(embedder, ft, ["a", "b"], {})
    module.trainer = SimpleNamespace(current_epoch=3, callback_metrics={
        "train/active_fraction": torch.tensor(0.0), "train/mean_pairwise_cosine": torch.tensor(0.1)})
    module.on_train_epoch_end()
    assert ("nothing left to learn" in caplog.text) is warned


@pytest.mark.slow
def test_finetune_caches_features_reuses_them_and_keeps_the_best_checkpoint(tmp_path, caplog):
    caplog.set_level("INFO")
    assert simsearch("finetune", *SMALL, "finetune.epochs=2", "run.dir=ft") == 0
    cache = Store.open(tmp_path / "ft" / "train-features")
    assert cache.manifest["split"] == "train"
    summary = read_json(tmp_path / "checkpoints" / "synthetic-supcon-unfreeze0" / "finetune.json")
    assert summary["best_checkpoint"].endswith(".ckpt") and 0 <= summary["best_score"] <= 1
    assert (summary["train_rows"], summary["validation_rows"]) == (60, 20)
    # the checkpoint is plain tensors and primitives: it loads with weights_only=True
    checkpoint = torch.load(summary["best_checkpoint"], weights_only=True, map_location="cpu")
    assert checkpoint["simsearch"]["head"]["dim"] == 16
    created = cache.manifest["created"]
    caplog.clear()
    assert simsearch("finetune", *SMALL, "finetune.epochs=1", "finetune.resume=false", "finetune.name=again",
                     "run.dir=ft") == 0
    assert "reusing the features" in caplog.text
    assert Store.open(tmp_path / "ft" / "train-features").manifest["created"] == created


@pytest.mark.slow
def test_resume_continues_from_the_saved_epoch(tmp_path, caplog):
    caplog.set_level("INFO")
    last_path = tmp_path / "checkpoints" / "synthetic-supcon-unfreeze0" / "last.ckpt"
    assert simsearch("finetune", *SMALL, "finetune.epochs=2", "finetune.patience=50", "run.dir=ft") == 0
    first = torch.load(last_path, weights_only=True, map_location="cpu")
    caplog.clear()
    assert simsearch("finetune", *SMALL, "finetune.epochs=4", "finetune.patience=50", "run.dir=ft") == 0
    assert "resuming from" in caplog.text
    resumed = torch.load(last_path, weights_only=True, map_location="cpu")
    assert resumed["global_step"] == 2 * first["global_step"]  # two more epochs of the same length
    assert read_json(last_path.parent / "finetune.json")["epochs_run"] == 4


@pytest.mark.slow
def test_best_checkpoint_round_trips_into_extract_and_compare(tmp_path):
    assert simsearch("finetune", *SMALL, "finetune.epochs=2", "run.dir=ft") == 0
    best = read_json(tmp_path / "checkpoints" / "synthetic-supcon-unfreeze0" / "finetune.json")["best_checkpoint"]
    assert simsearch("extract", *SMALL, f"model.checkpoint={best}", "run.dir=tuned") == 0
    tuned = Store.open(tmp_path / "tuned")
    assert tuned.dim == 16 and tuned.manifest["model"]["checkpoint"] == best
    assert simsearch("compare", *SMALL, f"compare.checkpoint={best}", "run.dir=cmp") == 0
    projected = Store.open(tmp_path / "cmp" / "head")  # head on the baseline's features, no second pass
    np.testing.assert_allclose(projected.embeddings, tuned.embeddings, atol=1e-5)
    comparison = read_json(tmp_path / "cmp" / "comparison.json")
    assert {"baseline", "finetuned", "difference"} <= set(comparison)
    assert "supcon loss" in comparison["finetuned_model"] and comparison["baseline_model"].endswith("weights)")
    assert comparison["difference"]["map@r"] == pytest.approx(
        comparison["finetuned"]["map@r"] - comparison["baseline"]["map@r"])
    from PIL import Image

    Image.open(tmp_path / "cmp" / "comparison.png").verify()
    # search embeds a new image through backbone + head, as the manifest records
    from simsearch.items import ItemImages

    ItemImages(tuned).image(3).save(tmp_path / "q.png")
    assert simsearch("search", "run.dir=tuned", f"query={tmp_path / 'q.png'}", "search.k=2", "logger=none") == 0


@pytest.mark.slow
def test_compare_trains_head_and_end_to_end_and_puts_three_models_side_by_side(tmp_path, capsys):
    """One command: the frozen baseline, a trained head and an end-to-end model in one table, JSON and chart."""
    assert simsearch("compare", *SMALL, "compare.unfreeze=[0,1]", "finetune.epochs=1", "run.dir=cmp") == 0
    printed = capsys.readouterr().out
    comparison = read_json(tmp_path / "cmp" / "comparison.json")
    assert [row["name"] for row in comparison["models"]] == ["baseline", "head", "end-to-end"]
    header = next(line for line in printed.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "baseline", "head", "end-to-end"]
    for row in comparison["models"]:  # each row is what `simsearch eval` says of that model's store
        assert simsearch("eval", f"run.dir=cmp/{row['name']}", "logger=none") == 0
        assert read_json(tmp_path / "cmp" / row["name"] / "metrics.json")["map@r"] == pytest.approx(row["metrics"]["map@r"])
    line = next(line for line in printed.splitlines() if line.startswith("map@r "))
    assert [float(v) for v in line.split()[1:]] == pytest.approx([row["metrics"]["map@r"] for row in comparison["models"]], abs=1e-4)
    end_to_end = torch.load(comparison["models"][2]["checkpoint"], weights_only=True, map_location="cpu")
    assert end_to_end["simsearch"]["unfreeze"] == 1
    assert Store.open(tmp_path / "cmp" / "end-to-end").manifest["model"]["checkpoint"] == comparison["models"][2]["checkpoint"]
    from PIL import Image

    Image.open(tmp_path / "cmp" / "comparison.png").verify()


def test_compare_refuses_a_missing_checkpoint_in_one_sentence(tmp_path, capsys):
    assert simsearch("compare", *SMALL, f"compare.checkpoints=[{tmp_path / 'nope.ckpt'}]", "run.dir=cmp") == 2
    assert "no checkpoint file at" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


@pytest.mark.slow
def test_end_to_end_starts_from_a_trained_head_and_refuses_another_backbones(tmp_path, capsys):
    """finetune.init_head: linear probe, then fine-tune. With the head's lr at 0 its weights stay those it started from."""
    assert simsearch("finetune", *SMALL, "finetune.epochs=1", "run.dir=ft") == 0
    head = read_json(tmp_path / "checkpoints" / "synthetic-supcon-unfreeze0" / "finetune.json")["best_checkpoint"]
    assert simsearch("finetune", *SMALL, "finetune.unfreeze=1", "finetune.epochs=1", "finetune.lr=0", "finetune.weight_decay=0",
                     f"finetune.init_head={head}", "finetune.warmup_epochs=0.5", "finetune.layer_decay=0.5", "run.dir=ft") == 0
    tuned = read_json(tmp_path / "checkpoints" / "synthetic-supcon-unfreeze1" / "finetune.json")["best_checkpoint"]
    started, ended = (torch.load(path, weights_only=True, map_location="cpu")["state_dict"] for path in (head, tuned))
    for name in ("embedder.head.layers.0.weight", "embedder.head.layers.3.weight", "embedder.head.layers.3.bias"):
        assert torch.equal(started[name], ended[name]), name
    capsys.readouterr()
    other = (*SMALL, "model.name=resnet18")
    assert simsearch("finetune", *other, "finetune.unfreeze=1", f"finetune.init_head={head}", "finetune.resume=false",
                     "run.dir=ft2") == 2
    assert "was trained on another backbone" in capsys.readouterr().err


def test_layer_decay_gives_each_lower_stage_group_a_smaller_learning_rate():
    from simsearch.model import backbone_spec, build_backbone, stage_groups
    from simsearch.training import backbone_groups, warmup_cosine

    network = build_backbone(backbone_spec({"name": "resnet18", "weights": "random", "image_size": 32}), 0).network
    groups = backbone_groups(network, 3, 1e-3, 0.5)
    assert [g["lr"] for g in groups] == pytest.approx([2.5e-4, 5e-4, 1e-3])  # bottom to top
    top = {id(p) for module in stage_groups(network)[-1] for p in module.parameters()}
    assert {id(p) for p in groups[-1]["params"]} == top
    assert backbone_groups(network, 0, 1e-3, 0.5) == []
    factors = [warmup_cosine(step, 4, 20) for step in range(20)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0]) and factors[4] == pytest.approx(1.0)
    assert factors[12] == pytest.approx(0.5) and factors[-1] < 0.05
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))


@pytest.mark.parametrize("setting, words", [("finetune.layer_decay=0", "finetune.layer_decay must be in (0, 1]"),
                                            ("finetune.warmup_epochs=99", "finetune.warmup_epochs must be between 0"),
                                            ("finetune.crop_scale=0", "finetune.crop_scale=0.0 must be a share"),
                                            ("finetune.crop_scale=1.5", "finetune.crop_scale=1.5 must be a share")])
def test_bad_schedule_settings_are_one_sentence(tmp_path, capsys, setting, words):
    assert simsearch("finetune", *SMALL, setting, "run.dir=ft") == 2
    assert words in capsys.readouterr().err


def test_crop_scale_one_only_flips_and_a_smaller_one_crops():
    from simsearch.data.loading import augment

    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8)
    flipped_only = augment(pixels, strong=False, crop_scale=1.0)
    for before, after in zip(pixels, flipped_only):
        assert torch.equal(after, before) or torch.equal(after, before.flip(-1))
    assert not torch.equal(flipped_only, pixels)  # some were flipped
    cropped = augment(pixels, strong=False, crop_scale=0.3)
    changed = [not (torch.equal(a, b) or torch.equal(a, b.flip(-1))) for a, b in zip(cropped, pixels)]
    assert sum(changed) > 32


@pytest.mark.slow
def test_ntxent_with_frozen_backbone_uses_cached_augmented_views(tmp_path):
    assert simsearch("finetune", *SMALL, "finetune.loss=ntxent", "finetune.epochs=1", "run.dir=ft") == 0
    view0, view1 = (Store.open(tmp_path / "ft" / "train-features" / f"view{v}") for v in (0, 1))
    assert view0.items == view1.items
    assert np.abs(view0.embeddings - view1.embeddings).max() > 1e-3  # different augmentations


@pytest.mark.slow
def test_unfrozen_stage_trains_end_to_end(tmp_path):
    assert simsearch("finetune", *SMALL, "finetune.unfreeze=1", "finetune.epochs=1", "run.dir=ft") == 0
    best = read_json(tmp_path / "checkpoints" / "synthetic-supcon-unfreeze1" / "finetune.json")["best_checkpoint"]
    state = torch.load(best, weights_only=True, map_location="cpu")["state_dict"]
    from simsearch.model import backbone_spec, build_backbone

    original = build_backbone(backbone_spec({"name": "resnet50", "weights": "random", "image_size": 32}), 0).network.state_dict()
    assert not torch.equal(state["embedder.backbone.layer4.0.conv1.weight"], original["layer4.0.conv1.weight"])
    assert torch.equal(state["embedder.backbone.layer1.0.conv1.weight"], original["layer1.0.conv1.weight"])
    # batch norms keep their statistics: the frozen stages' always, the unfrozen stage's with batch_norm=frozen
    for name in ("bn1.running_mean", "layer1.0.bn1.running_var", "layer4.0.bn1.running_mean", "layer4.2.bn3.running_var"):
        assert torch.equal(state[f"embedder.backbone.{name}"], original[name]), name
    assert simsearch("finetune", *SMALL, "finetune.unfreeze=1", "finetune.epochs=1", "finetune.batch_norm=train",
                     "finetune.name=bn-train", "run.dir=ft") == 0
    best = read_json(tmp_path / "checkpoints" / "bn-train" / "finetune.json")["best_checkpoint"]
    state = torch.load(best, weights_only=True, map_location="cpu")["state_dict"]
    assert torch.equal(state["embedder.backbone.layer1.0.bn1.running_var"], original["layer1.0.bn1.running_var"])
    assert not torch.equal(state["embedder.backbone.layer4.0.bn1.running_mean"], original["layer4.0.bn1.running_mean"])


def write_train_only_fashion_mnist(root, n=64):
    root.mkdir()
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 4
    images = (rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 60).astype(np.uint8)
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, n, 28, 28) + images.tobytes())
    with gzip.open(root / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 8, 1, n) + labels.astype(np.uint8).tobytes())


def test_validation_never_reads_the_test_split(tmp_path):
    write_train_only_fashion_mnist(tmp_path / "fm")  # no t10k files: any read of the test split fails
    arguments = [a for a in SMALL if not a.startswith("data=")]
    assert simsearch("finetune", *arguments, "data=fashion_mnist", f"data.root={tmp_path / 'fm'}", "data.split=test",
                     "finetune.epochs=1", "run.dir=ft") == 0


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (("data=folder", "data.labels=none"), "needs labels"),
    (("finetune.batch_size=64", "finetune.m_per_class=4"), "asks for 16 classes"),
    (("finetune.loss=arcface",), "finetune.loss must be"),
])
def test_bad_finetune_configs_fail_before_training(tmp_path, extra, message):
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "images" / f"{i}.png")
    result = simsearch_subprocess("finetune", *SMALL, f"data.root={tmp_path / 'images'}", *extra, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_incompatible_checkpoints_are_refused(tmp_path, capsys):
    assert simsearch("finetune", *SMALL, "finetune.epochs=1", "run.dir=ft") == 0
    capsys.readouterr()
    assert simsearch("finetune", *SMALL, "finetune.epochs=2", "finetune.dim=32", "run.dir=ft") == 2
    assert "trained differently" in capsys.readouterr().err
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    assert simsearch("extract", *SMALL, f"model.checkpoint={tmp_path / 'foreign.ckpt'}") == 2
    assert "not a simsearch fine-tuning checkpoint" in capsys.readouterr().err
