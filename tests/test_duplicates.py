"""`simsearch duplicates`: planted copies (identical, resized) found as groups; leakage between two stores."""

import numpy as np
import pytest
from PIL import Image

from simsearch.duplicates import connected_groups
from tests.helpers import TINY, read_json, simsearch, simsearch_subprocess, write_photo_folder


def plant(source, target) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.open(source).save(target)


def test_planted_identical_and_resized_copies_are_grouped(tmp_path, capsys):
    root = tmp_path / "photos"
    write_photo_folder(root)
    plant(root / "animals" / "chelsea.png", root / "copies" / "chelsea-again.png")  # pixel-identical
    resized = Image.open(root / "animals" / "chelsea.png").resize((64, 43), Image.BICUBIC)
    resized.save(root / "copies" / "chelsea-small.png")
    Image.open(root / "things" / "rocket.png").resize((160, 107), Image.BICUBIC).save(root / "copies" / "rocket-big.png")
    assert simsearch("extract", "data=folder", f"data.root={root}", *TINY, "run.dir=out") == 0

    assert simsearch("duplicates", "run.dir=out", "logger=none") == 0
    groups = read_json(tmp_path / "out" / "duplicates.json")
    assert sorted(sorted(g) for g in groups) == [
        ["animals/chelsea.png", "copies/chelsea-again.png", "copies/chelsea-small.png"],
        ["copies/rocket-big.png", "things/rocket.png"],
    ]
    assert len(groups[0]) == 3  # largest first
    printed = capsys.readouterr().out
    assert "2 groups of near-duplicates" in printed and "3 removable" in printed
    assert Image.open(tmp_path / "out" / "duplicates.png").size[0] > 300

    # a group larger than k forms through chains of pairs; a threshold of 1.01 finds nothing and says so
    assert simsearch("duplicates", "run.dir=out", "duplicates.k=1", "logger=none") == 0
    assert sorted(len(g) for g in read_json(tmp_path / "out" / "duplicates.json")) == [2, 3]
    result = simsearch_subprocess("duplicates", "run.dir=out", "duplicates.threshold=1.5", "logger=none", cwd=tmp_path)
    assert result.returncode == 2 and "cosine in [-1, 1]" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_leakage_lists_items_with_a_near_duplicate_in_the_other_store(tmp_path, capsys):
    train, test = tmp_path / "train", tmp_path / "test"
    write_photo_folder(train)
    test.mkdir()
    Image.open(train / "things" / "coffee.png").resize((72, 48), Image.BICUBIC).save(test / "coffee-small.png")
    plant(train / "animals" / "astronaut.png", test / "astronaut.png")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(test / "noise.png")
    common = ("data=folder", "data.labels=none", *TINY)
    assert simsearch("extract", *common, f"data.root={train}", "run.dir=train-store") == 0
    assert simsearch("extract", *common, f"data.root={test}", "run.dir=test-store") == 0

    assert simsearch("duplicates", "run.dir=test-store", f"duplicates.against={tmp_path / 'train-store'}", "logger=none") == 0
    leaks = read_json(tmp_path / "test-store" / "duplicates.json")
    assert sorted(leaks) == [["astronaut.png", "animals/astronaut.png"], ["coffee-small.png", "things/coffee.png"]]
    assert "2 of 3 items" in capsys.readouterr().out

    assert simsearch("extract", *common, f"data.root={test}", "model.image_size=48", "run.dir=other-model") == 0
    result = simsearch_subprocess("duplicates", "run.dir=other-model", f"duplicates.against={tmp_path / 'train-store'}",
                                  "logger=none", cwd=tmp_path)
    assert result.returncode == 2 and "embedded differently (model.image_size: 48 vs 32)" in result.stderr


def test_connected_groups_joins_chains_and_orders_by_size():
    groups = connected_groups(10, np.array([0, 1, 5, 7, 8]), np.array([1, 2, 6, 8, 9]))
    assert groups == [[0, 1, 2], [7, 8, 9], [5, 6]]
    assert connected_groups(3, np.zeros(0, np.int64), np.zeros(0, np.int64)) == []
