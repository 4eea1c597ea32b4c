"""`simsearch map`: the store's embeddings in 2-D, coloured by label, as a PNG (and in W&B)."""

import numpy as np
import pytest
from PIL import Image

from simsearch.projection import sample_rows
from tests.helpers import TINY, clustered, make_vector_store, simsearch


@pytest.mark.slow
@pytest.mark.parametrize("method", ["umap", "tsne"])
def test_map_writes_a_png_of_a_labelled_store(tmp_path, capsys, method):
    embeddings, labels = clustered(150, 3, dim=64)
    store = make_vector_store(tmp_path / "s", embeddings, labels)
    assert simsearch("map", f"run.dir={store.dir}", f"map.method={method}", "map.max_items=120", "logger=none") == 0
    picture = Image.open(store.dir / "embedding_map.png")
    picture.verify()
    assert "map of 120 of 150 items" in capsys.readouterr().out


@pytest.mark.slow
def test_map_with_thumbnails_logs_to_wandb(tmp_path):
    assert simsearch("extract", "data=synthetic", "data.num_items=30", *TINY, "run.dir=out") == 0
    assert simsearch("map", "run.dir=out", "map.thumbnails=5", "logger=wandb", f"logger.wandb.dir={tmp_path}") == 0
    assert Image.open(tmp_path / "out" / "embedding_map.png").size[0] >= 1000
    assert len(list((tmp_path / "wandb").glob("offline-run-*/files/media/images/map/*.png"))) == 1


def test_subsample_is_seeded_and_bad_settings_are_one_sentence(tmp_path, capsys):
    assert np.array_equal(sample_rows(1000, 50, 0), sample_rows(1000, 50, 0))
    assert not np.array_equal(sample_rows(1000, 50, 0), sample_rows(1000, 50, 1))
    assert np.array_equal(sample_rows(10, 50, 0), np.arange(10))
    embeddings, labels = clustered(20, 2, dim=8)
    store = make_vector_store(tmp_path / "s", embeddings, labels)
    assert simsearch("map", f"run.dir={store.dir}", "map.method=pca", "logger=none") == 2
    assert "map.method must be umap or tsne" in capsys.readouterr().err
