"""Label-free fine-tuning: every label-free loss of the registry learns, the two views follow their recipe, and a
collection without labels is adapted, its checkpoint selected and re-extracted through `simsearch finetune`."""

import gzip
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from simsearch.config import Config
from simsearch.model import Embedder, Preprocess, ProjectionHead
from simsearch.store import Store
from simsearch.training import LOSSES, MetricLearningModule
from simsearch.training.views import RATIO, ViewRecipe, crop_boxes, make_view, make_views
from tests.conftest import TINY, read_json, simsearch, simsearch_subprocess

pytest.importorskip("lightly")
SCHEMA = OmegaConf.structured(Config)
LABEL_FREE = [name for name, kind in LOSSES.items() if not kind.needs_labels]
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
STEPS = 25


def test_the_registry_has_simclr_and_a_momentum_teacher_all_label_free():
    assert {"simclr", "byol"} <= set(LABEL_FREE)
    assert all(LOSSES[name].views == 2 for name in LABEL_FREE)


@pytest.mark.parametrize("loss", LABEL_FREE)
def test_each_label_free_loss_lowers_on_a_tiny_fixed_batch(loss):
    """A fixed batch of 32 items, two noisy views of each, 25 steps: the loss falls; a teacher follows the student."""
    torch.manual_seed(0)
    items, dim = 32, 64
    features = torch.randn(items, dim)
    views = torch.stack([features + 0.3 * torch.randn_like(features) for _ in range(2)], dim=1)
    # a teacher that follows fast (momentum 0.9): over these few steps a slower one barely leaves its random start
    ft = OmegaConf.merge(SCHEMA.finetune, {"loss": loss, "dim": 16, "hidden_dim": 64, "ssl_dim": 32,
                                           "momentum": 0.9})
    embedder = Embedder(Preprocess(32, [0.5] * 3, [0.5] * 3), torch.nn.Identity(), ProjectionHead(dim, 64, 16))
    module = MetricLearningModule(embedder, ft, [], {})
    module.log = lambda *args, **kwargs: None  # no Trainer attached in this unit test
    module.trainer = SimpleNamespace(estimated_stepping_batches=STEPS, global_step=0, current_epoch=0)
    module.train()
    trained = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=1e-3)
    teacher_start = [p.clone() for p in module.teacher.parameters()] if module.teacher is not None else []
    losses = []
    for _ in range(STEPS):
        value = module.training_step({"features": views, "label": torch.full((items,), -1)}, 0)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        module.on_train_batch_end(value, None, 0)
        losses.append(float(value.detach()))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05 * abs(np.mean(losses[:5])), losses
    if teacher_start:  # the teacher moved, and only by following the student (it has no gradient)
        assert all(p.grad is None for p in module.teacher.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(teacher_start, module.teacher.parameters()))


def ramps(count: int, size: int = 64) -> torch.Tensor:
    """Channel 0 rises along x, channel 1 along y (4 per pixel), channel 2 is flat: a view shows its crop and flip."""
    steps = torch.arange(size) * 4
    image = torch.stack([steps.view(1, -1).expand(size, size), steps.view(-1, 1).expand(size, size),
                         torch.full((size, size), 128)]).to(torch.uint8)
    return image.expand(count, -1, -1, -1).contiguous()


def crop_and_flip(view: torch.Tensor, size: int = 64) -> tuple[float, float, bool]:
    """Share of the width and of the height a view shows, and whether it is mirrored, read off the ramps."""
    x, y = view[0].float(), view[1].float()
    width = (x.max() - x.min()).item() / (4 * (size - 1))
    height = (y.max() - y.min()).item() / (4 * (size - 1))
    return width, height, bool(x[:, 0].mean() > x[:, -1].mean())


def test_crop_boxes_keep_their_area_and_aspect_ratio_within_the_bounds():
    boxes = crop_boxes(2000, 0.3, torch.Generator().manual_seed(0))
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = width * height
    assert boxes.min() >= 0 and boxes.max() <= 1 + 1e-6
    assert area.min() >= 0.3 - 1e-6 and area.max() <= 1 + 1e-6
    assert area.min() < 0.32 and area.max() > 0.98  # the whole range is drawn
    ratio = width / height
    inside = (width < 1 - 1e-6) & (height < 1 - 1e-6)  # a box held by the image's edge gives up ratio, not area
    assert ratio[inside].min() >= RATIO[0] - 1e-4 and ratio[inside].max() <= RATIO[1] + 1e-4


@pytest.mark.parametrize("min_scale", [0.3, 0.9])
def test_two_views_of_an_image_differ_and_each_shows_a_crop_of_the_documented_size(min_scale):
    recipe = ViewRecipe(min_scale=min_scale, cj_prob=0.0, gray=0.0, blur=0.0)
    first, second = make_views(ramps(200), (recipe, recipe), torch.Generator().manual_seed(1))
    assert first.dtype == torch.uint8 and first.is_contiguous(memory_format=torch.channels_last)
    different = [not torch.equal(a, b) for a, b in zip(first, second)]
    assert sum(different) >= 190
    shown = [crop_and_flip(view) for view in torch.cat([first, second])]
    areas = np.array([w * h for w, h, _ in shown])
    assert areas.min() >= min_scale - 0.06 and areas.max() <= 1.0 + 1e-6  # a pixel's edge of slack at 64 px
    flipped = np.mean([mirrored for _, _, mirrored in shown])
    assert 0.4 < flipped < 0.6  # flip probability 0.5
    assert (first[:, 2] == 128).all()  # no colour step in this recipe: the flat channel stays flat


def test_without_a_crop_a_view_is_the_image_or_its_mirror():
    pixels = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8)
    view = make_view(pixels, ViewRecipe(min_scale=1.0, cj_prob=0.0, gray=0.0, blur=0.0), torch.Generator().manual_seed(0))
    assert all(torch.equal(v, p) or torch.equal(v, p.flip(-1)) for v, p in zip(view, pixels))


def test_colour_steps_keep_a_grey_image_grey_and_change_its_brightness():
    grey = ramps(64)[:, :1].expand(-1, 3, -1, -1).contiguous()
    view = make_view(grey, ViewRecipe(min_scale=1.0, flip=0.0, cj_prob=1.0, gray=0.0, blur=0.0),
                     torch.Generator().manual_seed(0))
    assert torch.equal(view[:, 0], view[:, 1]) and torch.equal(view[:, 1], view[:, 2])
    assert sum(not torch.equal(v, g) for v, g in zip(view, grey)) >= 60


def write_unlabelled_products(folder: Path, count: int) -> None:
    """Fashion-MNIST test images as PNG files in one flat folder: products, no class folders, no labels."""
    from PIL import Image

    with gzip.open(FASHION) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    folder.mkdir()
    for i in range(count):
        Image.fromarray(images[i]).save(folder / f"product-{i:03d}.png")


LABEL_FREE_RUN = (*TINY, "model.name=resnet18", "data=folder", "data.labels=none", "finetune.batch_size=8",
                  "finetune.dim=16", "finetune.hidden_dim=32", "finetune.ssl_dim=32",
                  "finetune.val_fraction=0.2", "finetune.epochs=1")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_file(), reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("loss, unfreeze", [("byol", 1), ("simclr", 0)])
def test_an_unlabelled_flat_folder_is_adapted_selected_and_reextracted(tmp_path, loss, unfreeze):
    write_unlabelled_products(tmp_path / "products", 40)
    run = (*LABEL_FREE_RUN, f"data.root={tmp_path / 'products'}", f"finetune.loss={loss}", f"finetune.unfreeze={unfreeze}")
    result = simsearch_subprocess("finetune", *run, "finetune.name=products", "run.dir=ft", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "val/rankme" in result.stdout and "val/precision@10" not in result.stdout  # no label was there to report with
    summary = read_json(tmp_path / "checkpoints" / "products" / "finetune.json")
    assert summary["monitor"] == "last" and summary["best_checkpoint"].endswith("best-epoch000.ckpt")
    assert (summary["train_rows"], summary["validation_rows"]) == (32, 8)
    checkpoint = torch.load(tmp_path / summary["best_checkpoint"], weights_only=True, map_location="cpu")
    assert checkpoint["simsearch"]["loss"] == loss
    result = simsearch_subprocess("extract", *run, f"model.checkpoint={summary['best_checkpoint']}", "run.dir=tuned",
                                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    store = Store.open(tmp_path / "tuned")
    assert len(store) == 40 and store.dim == 16 and (store.labels == -1).all()
    result = simsearch_subprocess("search", "run.dir=tuned", "query=0", "search.k=3", "logger=none", cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_a_label_free_loss_refuses_a_monitor_that_reads_labels(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    from PIL import Image

    for i in range(12):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / "images" / f"{i}.png")
    assert simsearch("finetune", *LABEL_FREE_RUN, f"data.root={tmp_path / 'images'}", "finetune.loss=simclr",
                     "finetune.monitor=val/map@r", "run.dir=ft") == 2
    assert "reads labels" in capsys.readouterr().err


DDP_STEP = r'''
import os, sys
import torch, torch.distributed as dist
from omegaconf import OmegaConf
from simsearch.config import Config
from simsearch.model import Embedder, Preprocess, ProjectionHead
from simsearch.training import MetricLearningModule


def first_step_gradients(loss, rank, world):
    """The gradients of the method's first step on this rank's share of a fixed batch, averaged over the ranks as
    DDP averages them. Batch norms in eval mode: per-rank batch statistics are what DDP cannot make equal on CPUs
    (SyncBatchNorm is GPU-only), everything else of the step is the method's."""
    torch.manual_seed(0)
    features = torch.randn(16, 32)
    views = torch.stack([features + 0.3 * torch.randn_like(features) for _ in range(2)], dim=1)
    ft = OmegaConf.merge(OmegaConf.structured(Config).finetune, {"loss": loss, "dim": 8, "hidden_dim": 16, "ssl_dim": 8})
    torch.manual_seed(1)
    module = MetricLearningModule(Embedder(Preprocess(8, [0.5] * 3, [0.5] * 3), torch.nn.Identity(), ProjectionHead(32, 16, 8)),
                                  ft, [], {})
    module.log = lambda *args, **kwargs: None
    module.eval()
    share = slice(rank, None, world)
    value = module.training_step({"features": views[share], "label": torch.full((16,), -1)[share]}, 0)
    value.backward()
    grads = [p.grad.clone() for p in module.parameters() if p.grad is not None]
    if world > 1:
        for grad in grads:
            dist.all_reduce(grad)
            grad /= world
    return grads


rank, world, loss, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if world > 1:
    dist.init_process_group("gloo", rank=rank, world_size=world)
grads = first_step_gradients(loss, rank, world)
if rank == 0:
    torch.save(grads, out)
'''


@pytest.mark.slow
@pytest.mark.parametrize("loss", LABEL_FREE)
def test_two_ddp_processes_take_the_first_step_of_one(tmp_path, loss):
    """SimCLR's negatives come from every rank (lightly's gather): 2 gloo processes with half the batch each take
    the step that one process takes with all of it; BYOL's loss is per item, so it holds for it too."""
    import os
    import subprocess
    import sys

    script = tmp_path / "step.py"
    script.write_text(DDP_STEP)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), "0", "1", loss, str(tmp_path / "one.pt")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    ranks = [subprocess.Popen([sys.executable, str(script), str(rank), "2", loss, str(tmp_path / "two.pt")], env=env,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    for process in ranks:
        assert process.wait(timeout=300) == 0, process.stderr.read()
    single, distributed = (torch.load(tmp_path / name, weights_only=True) for name in ("one.pt", "two.pt"))
    assert len(single) == len(distributed) > 0
    for a, b in zip(single, distributed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def unlabelled_hf_dataset(products: Path, root: Path) -> list[str]:
    """The products as a Hugging Face dataset saved to disk with an image column and nothing else."""
    datasets = pytest.importorskip("datasets")
    files = sorted(products.iterdir())
    dataset = datasets.Dataset.from_dict({"image": [{"bytes": f.read_bytes(), "path": None} for f in files]},
                                         features=datasets.Features({"image": datasets.Image()}))
    dataset.save_to_disk(root)
    return ["data=hf", f"data.root={root}"]


def unlabelled_shards(products: Path, root: Path) -> list[str]:
    """The products as WebDataset shards of `png` samples with no `cls`."""
    webdataset = pytest.importorskip("webdataset")
    root.mkdir()
    files = sorted(products.iterdir())
    for number, start in enumerate(range(0, len(files), 20)):
        with webdataset.TarWriter(str(root / f"train-{number:06d}.tar")) as sink:
            for f in files[start:start + 20]:
                sink.write({"__key__": f.stem, "png": f.read_bytes()})
    return ["data=webdataset", f"data.urls={root}/train-{{000000..000001}}.tar"]


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_file(), reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("source", [unlabelled_hf_dataset, unlabelled_shards])
def test_a_dataset_without_a_label_column_or_cls_is_adapted_end_to_end(tmp_path, source):
    write_unlabelled_products(tmp_path / "products", 40)
    data = source(tmp_path / "products", tmp_path / "data")
    run = (*[a for a in LABEL_FREE_RUN if not a.startswith("data.labels")], *data, "finetune.loss=byol", "finetune.unfreeze=1")
    run = tuple(a for a in run if a != "data=folder")
    result = simsearch_subprocess("finetune", *run, "finetune.name=products", "run.dir=ft", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = read_json(tmp_path / "checkpoints" / "products" / "finetune.json")
    assert summary["monitor"] == "last" and summary["train_rows"] == 32
    result = simsearch_subprocess("extract", *run, f"model.checkpoint={summary['best_checkpoint']}", "run.dir=tuned",
                                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(Store.open(tmp_path / "tuned")) == 40


@pytest.mark.slow
def test_compare_puts_a_label_free_head_beside_the_frozen_baseline_and_a_supervised_head(tmp_path):
    small = (*TINY, "data=synthetic", "data.num_items=80", "data.num_classes=4", "finetune.batch_size=16",
             "finetune.m_per_class=4", "finetune.dim=16", "finetune.hidden_dim=32", "finetune.ssl_dim=32",
             "finetune.val_fraction=0.25", "finetune.epochs=1")
    assert simsearch("compare", *small, "compare.losses=[byol,supcon]", "compare.unfreeze=[0]", "run.dir=cmp") == 0
    comparison = read_json(tmp_path / "cmp" / "comparison.json")
    assert [row["name"] for row in comparison["models"]] == ["baseline", "label-free-head", "head"]
    assert "byol loss" in comparison["models"][1]["description"]
    label_free = read_json(tmp_path / "checkpoints" / "synthetic-byol-unfreeze0" / "finetune.json")
    assert label_free["monitor"] == "last"
