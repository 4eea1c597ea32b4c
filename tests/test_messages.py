"""What a new user reads when something is wrong, word for word through the CLI (issue 23)."""

import pytest

from tests.conftest import TINY, simsearch


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
