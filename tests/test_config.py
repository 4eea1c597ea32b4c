from pathlib import Path

import pytest
from omegaconf import OmegaConf

from simsearch.config import load_config
from simsearch.errors import SimsearchError
from simsearch.model import resolve_model_config
from tests.conftest import simsearch


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


def test_every_config_file_loads():
    root = Path(__file__).resolve().parent.parent / "configs"
    for group in ("data", "model", "logger"):
        for path in (root / group).glob("*.yaml"):
            extra = ["data.root=/x"] if path.stem == "folder" and group == "data" else []
            load_config([f"{group}={path.stem}", *extra])


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
