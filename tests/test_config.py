import shutil
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from simsearch.config import load_config
from simsearch.errors import SimsearchError
from simsearch.model import resolve_model_config
from tests.helpers import simsearch


def test_defaults_reproduce_the_reference_experiment():
    cfg = load_config([])
    assert (cfg.data.name, cfg.data.split, cfg.model.name, cfg.model.weights) == ("cifar10", "test", "resnet50", "imagenet")
    model = resolve_model_config(cfg.model)  # null preprocessing: IMAGENET1K_V2's own transforms
    assert (model.image_size, list(model.mean), model.interpolation) == (224, [0.485, 0.456, 0.406], "bilinear")
    assert cfg.run.dir == "outputs/cifar10-test"
    assert list(cfg.eval.k) == [1, 5, 10, 20, 100]


def test_groups_and_overrides_compose():
    cfg = load_config(["data=folder", "data.root=/images", "model.image_size=64", "logger=none"])
    assert (cfg.data.name, cfg.data.root, cfg.model.image_size) == ("folder", "/images", 64)
    assert cfg.logger.wandb.enabled is False
    assert cfg.run.dir == "outputs/folder-test"


@pytest.mark.parametrize(
    "arguments, words",
    [
        (["config", "data.rooot=/x"], ["data.rooot"]),
        (["config", "model.image_size=big"], ["model.image_size"]),
        (["config", "data=imagenet21k"], ["imagenet21k", "cifar10"]),
        (["extract", "data=folder"], ["data.root", "must be given"]),
        (["config", "nonsense"], ["key=value"]),
        (["config", "experiment=demo_shopp"], ["experiment=demo_shopp", "demo_shop"]),
        (["config", "trainer=gpus"], ["trainer=gpus", "ddp"]),
    ],
)
def test_bad_config_is_one_sentence_naming_the_key(arguments, words, capsys):
    assert simsearch(*arguments) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error
    for word in words:
        assert word in error


def test_load_config_raises_simsearch_error():
    with pytest.raises(SimsearchError, match="eval.kk"):
        load_config(["eval.kk=3"])


def test_config_command_prints_resolved_yaml(capsys):
    assert simsearch("config", "data=synthetic", "run.seed=7") == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert printed.run.seed == 7 and printed.run.dir == "outputs/synthetic-test"


def test_unknown_command(capsys):
    assert simsearch("extrakt") == 2
    assert "unknown command" in capsys.readouterr().err


CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# Written by hand: the groups of configs/ and the recipes the Makefile and scripts/finetune_results.py run.
FOLDERS = {"run", "data", "model", "trainer", "index", "eval", "search", "finetune", "logger", "experiment"}
EXPERIMENTS = {"demo", "demo_shop", "finetune_head", "finetune_e2e"}
# Keys a preset leaves `???` on purpose (the user must give them), with a value that lets it load.
MUST_GIVE = {"data/folder": ["data.root=/x"], "data/webdataset": ["data.urls=x.tar"], "finetune/e2e": ["finetune.unfreeze=1"]}


def file_leaves(node: dict, prefix: str = "") -> dict:
    """The dotted keys and values of a YAML file as PyYAML reads it (not through simsearch's loader)."""
    leaves = {}
    for key, value in node.items():
        if isinstance(value, dict):
            leaves.update(file_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def test_every_preset_and_experiment_loads_and_is_applied():
    """Each file of configs/ chosen on its own: it loads, passes the schema and the checks, and every value it
    sets is in the result (a preset silently ignored would fail). An empty or missing configs/ fails too."""
    assert {path.name for path in CONFIGS.iterdir() if path.is_dir()} == FOLDERS
    assert {path.stem for path in (CONFIGS / "experiment").glob("*.yaml")} >= EXPERIMENTS
    files = sorted(CONFIGS.glob("*/*.yaml"))
    assert len(files) >= 30, files
    for path in files:
        group, name = path.parent.name, path.stem
        cfg = load_config([f"{group}={name}", *MUST_GIVE.get(f"{group}/{name}", [])])
        written = yaml.safe_load(path.read_text())
        written.pop("defaults", None)
        prefix = "" if group == "experiment" else f"{group}."
        for key, value in file_leaves(written, prefix).items():
            actual = OmegaConf.select(cfg, key)
            if value == "???":
                assert actual is not None, key
            elif isinstance(value, str) and "${" in value:
                assert "${" not in actual, (path, key, actual)  # resolved
            elif isinstance(actual, float):
                assert actual == float(value), (path, key, actual, value)
            else:
                assert (OmegaConf.to_container(actual) if OmegaConf.is_config(actual) else actual) == value, (path, key)


# The recipes as the Makefile (DEMO, SHOP) and docs/RESULTS.md's recorded commands gave them before they became
# experiment files; written by hand from those lines.
RECIPES = {
    "demo": {"data.name": "fashion_mnist", "data.root": "/usr/share/datasets/fashion-mnist", "data.split": "test",
             "model.name": "timm/tf_efficientnet_lite0", "model.weights": "imagenet", "model.image_size": 96,
             "logger.wandb.enabled": False, "run.dir": "outputs/demo"},
    "demo_shop": {"data.name": "fashion_mnist", "model.name": "timm/tf_efficientnet_lite0", "model.weights": "imagenet",
                  "model.image_size": 96, "logger.wandb.enabled": False, "run.dir": "outputs/shop",
                  "data.metadata": "outputs/shop-catalogue.csv", "search.filter": "price < 70 and in_stock == true",
                  "index.backend": "faiss"},
    "finetune_head": {"data.name": "fashion_mnist", "data.root": "/usr/share/datasets/fashion-mnist", "data.limit": None,
                      "model.name": "timm/tf_efficientnet_lite0", "model.weights": "imagenet", "model.image_size": 64,
                      "finetune.unfreeze": 0, "finetune.loss": "supcon", "finetune.epochs": 20, "finetune.lr": 1e-3,
                      "logger.wandb.enabled": False},
    "finetune_e2e": {"data.name": "fashion_mnist", "data.root": "/usr/share/datasets/fashion-mnist", "data.limit": None,
                     "data.num_workers": 0, "model.name": "timm/tf_efficientnet_lite0", "model.weights": "imagenet",
                     "model.image_size": 32, "finetune.unfreeze": 7, "finetune.epochs": 15, "finetune.loss": "supcon",
                     "finetune.backbone_lr": 3e-4, "finetune.lr": 3e-3, "finetune.warmup_epochs": 1.0,
                     "finetune.crop_scale": 1.0, "finetune.batch_norm": "frozen", "finetune.layer_decay": 1.0,
                     "logger.wandb.enabled": False},
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_an_experiment_is_the_recipe_it_replaced(name, capsys):
    assert simsearch("config", f"experiment={name}") == 0  # as typed
    printed = OmegaConf.create(capsys.readouterr().out)
    for key, value in RECIPES[name].items():
        assert OmegaConf.select(printed, key) == value, key


def test_the_end_to_end_experiment_trains_every_stage_of_lite0():
    """finetune.unfreeze=7 in experiment/finetune_e2e.yaml is all of Lite0's stage groups (the row's recipe)."""
    from simsearch.model import backbone_spec, build_backbone, stage_groups

    cfg = load_config(["experiment=finetune_e2e", "model.weights=random"])
    assert len(stage_groups(build_backbone(backbone_spec(cfg.model), 0).network)) == cfg.finetune.unfreeze == 7


def test_the_command_line_wins_over_an_experiment():
    """Experiment keys over its presets; then the command line: a key, or a group's preset, in any order."""
    for arguments in (["experiment=demo", "model.image_size=64"], ["model.image_size=64", "experiment=demo"]):
        assert load_config(arguments).model.image_size == 64
    cfg = load_config(["experiment=demo", "model=resnet50", "data=synthetic"])
    assert (cfg.model.name, cfg.data.name, cfg.model.image_size, cfg.run.dir) == ("resnet50", "synthetic", 96, "outputs/demo")
    # the experiment's keys still hold over a preset chosen on the command line
    assert load_config(["experiment=finetune_e2e", "finetune=head"]).finetune.unfreeze == 7
    assert load_config(["experiment=finetune_e2e", "finetune.unfreeze=3"]).finetune.unfreeze == 3


def test_a_key_a_preset_leaves_open_is_given_by_an_experiment_or_refused(capsys):
    assert load_config(["experiment=finetune_e2e"]).finetune.unfreeze == 7
    assert simsearch("finetune", "finetune=e2e", "data=synthetic") == 2
    error = capsys.readouterr().err
    assert "finetune.unfreeze" in error and "must be given" in error and error.count("\n") == 1


def test_a_new_experiment_in_a_configs_folder_of_ones_own(tmp_path, monkeypatch, capsys):
    """docs/configuration.md's way to add one: a copy of configs/ named by SIMSEARCH_CONFIGS, one file more."""
    mine = tmp_path / "my-configs"
    shutil.copytree(CONFIGS, mine)
    (mine / "experiment" / "tiny.yaml").write_text("defaults:\n  data: synthetic\n  model: pixels\n"
                                                   "data:\n  num_items: 8\nrun:\n  dir: outputs/tiny\n")
    monkeypatch.setenv("SIMSEARCH_CONFIGS", str(mine))
    assert simsearch("config", "experiment=tiny") == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    shown = (printed.data.name, printed.data.num_items, printed.model.name, printed.run.dir)
    assert shown == ("synthetic", 8, "pixels", "outputs/tiny")
    (mine / "experiment" / "loop.yaml").write_text("defaults:\n  experiment: tiny\n")
    assert simsearch("config", "experiment=loop") == 2
    assert "unknown config group 'experiment'" in capsys.readouterr().err


def test_the_configuration_reference_is_generated_from_the_schema():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, str(root / "scripts" / "config_reference.py"), "--check"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_config_prints_any_group_choice_marking_required_keys(capsys):
    assert simsearch("config", "data=folder") == 0
    printed = capsys.readouterr().out
    assert "root: ???" in printed and "name: folder" in printed
