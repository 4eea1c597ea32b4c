"""One Registry type behind the extension tables: a duplicate name warns (the later entry is used), an
unknown name is one sentence listing the known ones, and every entry of each table is tested by iterating
it, so a new dataset, family, metric or command is tested without a new test."""

import numpy as np
import pytest

from simsearch.cli import COMMANDS, register_command
from simsearch.data import DATASETS, ArrayCollection, register_dataset
from simsearch.errors import SimsearchError
from simsearch.metrics import METRICS, Ranking, per_query_metrics, register_metric
from simsearch.model import FAMILIES, Family, Preprocessing, register_family
from simsearch.registry import DuplicateRegistration, Registry
from tests.helpers import simsearch


def _dataset(data, options):
    return ArrayCollection(np.zeros((2, 4, 4), np.uint8), np.zeros(2), ["one"])


def _family():
    from torch import nn

    return Family(names=lambda: ["tiny"], preprocessing=lambda arch: Preprocessing(8, (0.5,) * 3, (0.5,) * 3, "bilinear"),
                  build=lambda arch, size: (nn.Flatten(), "average"))


def _metric(hits, relevant, k):
    return hits[:, :k].mean(axis=1)


def _command(cfg):
    return None


# each table with how a user registers into it (the public decorator) and a name already there
TABLES = {
    "datasets": (DATASETS, lambda name: register_dataset(name, help="a duplicate")(_dataset), "synthetic"),
    "families": (FAMILIES, lambda name: register_family(name)(_family), "pixels"),
    "metrics": (METRICS, lambda name: register_metric(name)(_metric), "precision@{k}"),
    "commands": (COMMANDS, lambda name: register_command(name, help="a duplicate")(_command), "config"),
}


@pytest.fixture(params=sorted(TABLES))
def table(request):
    registry, register, existing = TABLES[request.param]
    before = dict(registry)
    yield registry, register, existing
    registry.restore(before)


def test_every_table_is_a_registry():
    for registry, _, _ in TABLES.values():
        assert isinstance(registry, Registry) and len(registry) > 0


def test_a_duplicate_name_warns_and_the_later_entry_is_used(table):
    registry, register, existing = table
    first = registry[existing]
    with pytest.warns(DuplicateRegistration, match=f"'{existing}' is registered twice") as caught:
        register(existing)
    assert caught[0].filename == __file__  # the warning points at the line that registered again
    assert registry[existing] is not first
    assert list(registry).count(existing) == 1


def test_a_new_name_registers_without_a_word(table, recwarn):
    registry, register, _ = table
    register("brand-new")
    assert "brand-new" in registry
    assert not [w for w in recwarn if issubclass(w.category, DuplicateRegistration)]


def test_an_unknown_name_is_one_sentence_listing_the_known_ones(table):
    registry, _, existing = table
    with pytest.raises(SimsearchError, match=r"unknown .*'nonesuch' \(known: ") as raised:
        registry["nonesuch"]
    assert all(name in str(raised.value) for name in registry) and existing in str(raised.value)


def test_unknown_names_through_the_cli(capsys):
    assert simsearch("nonesuch") == 2
    error = capsys.readouterr().err
    assert "unknown command 'nonesuch'" in error and all(name in error for name in COMMANDS)
    assert simsearch("config", "data.name=nonesuch") == 2
    error = capsys.readouterr().err
    assert "unknown data.name 'nonesuch'" in error and all(name in error for name in DATASETS)


def test_every_dataset_kind_has_help_and_sensible_splits():
    for name, kind in DATASETS.items():
        assert kind.help.strip() and "\n" not in kind.help, name
        assert all(isinstance(split, str) and split for split in kind.splits), name


def test_every_family_gives_its_first_names_a_preprocessing():
    for prefix, family in FAMILIES.items():
        names = list(family.names())
        assert names, prefix
        for arch in dict.fromkeys([*names[:3], *([family.default_arch] if family.default_arch else [])]):
            prepared = family.preprocessing(arch)
            assert isinstance(prepared, Preprocessing) and prepared.image_size > 0, (prefix, arch)
            assert len(prepared.mean) == 3 and len(prepared.std) == 3 and min(prepared.std) > 0, (prefix, arch)


def test_every_metric_is_one_for_a_perfect_ranking_and_zero_for_a_ranking_without_relevant_items():
    """A hand-made table of two queries, three neighbours each: query 0 finds its three relevant items first
    (all of class 0, its own), query 1 has one relevant item that is not among its neighbours (class 1)."""
    hits = np.array([[True, True, True], [False, False, False]])
    relevant = np.array([3, 1])
    ranking = Ranking(hits, relevant, neighbour_labels=np.array([[0, 0, 0], [0, 0, 0]]),
                      scores=np.array([[0.9, 0.8, 0.7], [0.9, 0.8, 0.7]]), query_labels=np.array([0, 1]))
    values = per_query_metrics(hits, relevant, [3], ranking, knn_ks=[3])
    assert sorted(values) == sorted(name for metric in METRICS.values() for name in metric.names([3]))
    for name, value in values.items():
        np.testing.assert_allclose(value, [1.0, 0.0], err_msg=name)


def test_every_command_names_a_function():
    for name, command in COMMANDS.items():
        assert command.help.strip(), name
        assert callable(command.function()), name
