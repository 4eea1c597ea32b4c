"""The README's "Extending simsearch" examples, run as written: a backbone family, a dataset, a metric, a
loss and a command, each registered and then used through the CLI, as a user who copied them would."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from simsearch.cli import COMMANDS
from simsearch.data import DATASETS
from simsearch.metrics import METRICS
from simsearch.model import FAMILIES
from simsearch.store import Store
from simsearch.training import LOSSES
from tests.conftest import TINY, clustered, make_vector_store, read_json, simsearch

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_examples() -> list[str]:
    """The Python blocks of the README's "Extending simsearch" section, in order."""
    text = README.read_text()
    section = text[text.index("## Extending simsearch"):]
    section = section[: section.index("\n## ", 3)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture
def registered():
    """Run the README's examples; afterwards the registries are as they were (other tests see no extension)."""
    saved = [(table, dict(table)) for table in (FAMILIES, DATASETS, METRICS, LOSSES, COMMANDS)]
    blocks = readme_examples()
    assert len(blocks) == 5, "the README shows one example per registry: family, dataset, metric, loss, command"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    yield
    for table, before in saved:
        entries = getattr(table, "_entries", table)  # a Registry (losses) keeps its entries in a plain dict
        entries.clear()
        entries.update(before)


def test_a_registered_backbone_family_extracts(registered, tmp_path):
    assert simsearch("extract", "data=synthetic", "data.num_items=12", *TINY, "model.name=mylib/tiny", "run.dir=out") == 0
    store = Store.open(tmp_path / "out")
    assert store.dim == 8  # the family's network: 8 channels, pooled
    assert store.manifest["embedder"]["name"] == "mylib/tiny"
    np.testing.assert_allclose(np.linalg.norm(store.vectors(), axis=1), 1.0, atol=1e-5)
    # a misspelt architecture of the family is one sentence naming the family's own names
    assert simsearch("extract", "data=synthetic", *TINY, "model.name=mylib/tinny", "run.dir=bad") == 2


def test_a_registered_dataset_is_a_data_choice(registered, tmp_path, capsys):
    assert simsearch("extract", "data=digits", "data.split=test", "model=pixels", "model.image_size=8", *TINY[2:],
                     "run.dir=digits") == 0
    store = Store.open(tmp_path / "digits")
    assert len(store) == 797 and store.classes == [str(d) for d in range(10)]
    assert simsearch("eval", "run.dir=digits", "logger=none") == 0
    assert read_json(tmp_path / "digits" / "metrics.json")["precision@1"] > 0.9  # raw pixels of digits: ~0.98
    capsys.readouterr()
    assert simsearch("--help") == 0
    assert "digits" in capsys.readouterr().out  # the usage lists the table of datasets
    assert simsearch("extract", "data=digits", "data.split=val", "model=pixels", *TINY[2:], "run.dir=x") == 2


def test_a_registered_metric_is_computed_printed_and_saved(registered, tmp_path, capsys):
    vectors, labels = clustered(60, 3, dim=8, spread=1.5, seed=3)
    store = make_vector_store(tmp_path / "vectors", vectors, labels)
    assert simsearch("eval", f"run.dir={store.dir}", "eval.k=[5]", "logger=none") == 0
    assert "ndcg@K" in capsys.readouterr().out
    saved = read_json(store.dir / "metrics.json")["ndcg@5"]
    # a plain loop over a brute-force ranking (every other item, best first; ties by row)
    unit = store.vectors()
    values = []
    for q in range(len(unit)):
        scores = unit @ unit[q]
        order = [r for r in sorted(range(len(unit)), key=lambda r: (-scores[r], r)) if r != q][:5]
        hits = [labels[r] == labels[q] for r in order]
        relevant = int((labels == labels[q]).sum()) - 1
        ideal = sum(1 / np.log2(i + 2) for i in range(min(relevant, 5)))
        values.append(sum(h / np.log2(i + 2) for i, h in enumerate(hits)) / ideal)
    assert saved == pytest.approx(float(np.mean(values)), abs=1e-6)


def test_a_registered_loss_fine_tunes(registered, tmp_path):
    assert simsearch("finetune", "data=synthetic", "data.num_items=96", "data.num_classes=4", "model=pixels",
                     "model.image_size=8", *TINY[2:], "finetune.loss=multi_similarity", "finetune.epochs=1",
                     "finetune.batch_size=32", "finetune.m_per_class=8", "finetune.val_fraction=0.2",
                     f"run.dir={tmp_path / 'ft'}", f"finetune.checkpoint_dir={tmp_path / 'checkpoints'}") == 0
    record = json.loads(next((tmp_path / "checkpoints").rglob("finetune.json")).read_text())
    assert record["metadata"]["loss"] == "multi_similarity"


@pytest.mark.slow
def test_plugins_reach_the_cli_through_an_environment_variable(tmp_path):
    dataset_example = readme_examples()[1]
    (tmp_path / "my_plugin.py").write_text(textwrap.dedent(dataset_example))
    script = Path(sys.executable).parent / "simsearch"
    env = {**os.environ, "SIMSEARCH_PLUGINS": "my_plugin", "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([str(script), "extract", "data=digits", "data.split=train", "data.limit=50", "model=pixels",
                             "model.image_size=8", *TINY[2:], "run.dir=plugged"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(Store.open(tmp_path / "plugged")) == 50
    missing = subprocess.run([str(script), "config", "data=synthetic"], cwd=tmp_path, capture_output=True, text=True,
                             env={**env, "SIMSEARCH_PLUGINS": "no_such_plugin"}, timeout=300)
    assert missing.returncode == 2 and "SIMSEARCH_PLUGINS=no_such_plugin" in missing.stderr


def test_a_registered_command_runs_with_the_config_and_is_listed(registered, tmp_path, capsys):
    assert simsearch("extract", "data=synthetic", "data.num_items=9", "model=pixels", "model.image_size=8", *TINY[2:],
                     "run.dir=store") == 0
    capsys.readouterr()
    assert simsearch("count", "run.dir=store") == 0
    assert capsys.readouterr().out.strip() == "9"
    assert simsearch("count", "run.dir=nowhere") == 2  # the store's own sentence, exit 2
    assert "no store in nowhere" in capsys.readouterr().err
    assert simsearch("--help") == 0
    assert "count" in capsys.readouterr().out
