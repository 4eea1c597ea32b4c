"""The holes a hostile probe found in what simsearch reads (issue 19), each tried again through the CLI, the
Python API or HTTP: blank images and formats not read, a same-size rewrite, links retargeted, run.dir inside
the collection, names that are not UTF-8 and PostScript named .png."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from simsearch.files import read_jsonl
from simsearch.store import Store
from tests.helpers import extract_pixels, no_space, one_sentence, simsearch, write_folder, write_image

# ---------------------------------------------------------------- 1. no zero vector, no file silently ignored


def test_blank_images_and_unread_files_are_in_skipped_jsonl(tmp_path):
    root = tmp_path / "images"
    write_folder(root)
    Image.new("RGB", (12, 12), (0, 0, 0)).save(root / "cats" / "black.png")  # raw pixels: a zero vector
    for name in ("photo.avif", "photo.heic", "photo.jfif", "drawing.svg", "notes.txt"):
        (root / "dogs" / name).write_bytes(b"not read")
    (root / "dogs" / "folder.png").mkdir()
    os.mkfifo(root / "dogs" / "pipe.png")
    assert extract_pixels(root) == 0
    store = Store.open(tmp_path / "store")
    norms = np.linalg.norm(store.vectors(), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert len(store) == 6
    skipped = {s["path"]: s["reason"] for s in read_jsonl(tmp_path / "store" / "skipped.jsonl")}
    assert "zero or not finite" in skipped["cats/black.png"]
    for name in ("photo.avif", "photo.heic", "photo.jfif", "drawing.svg", "notes.txt"):
        assert "not an image format simsearch reads" in skipped[f"dogs/{name}"]
    assert "folder named like an image" in skipped["dogs/folder.png"]
    assert "not a regular file" in skipped["dogs/pipe.png"]
    assert store.manifest["skipped"] == 8


def test_a_blank_query_is_one_sentence(tmp_path, capsys):
    root = tmp_path / "images"
    write_folder(root)
    assert extract_pixels(root) == 0
    Image.new("RGBA", (12, 12), (0, 0, 0, 255)).save(tmp_path / "blank.png")
    capsys.readouterr()
    assert simsearch("search", "run.dir=store", "query=blank.png", "logger=none") == 2
    assert "zero or non-finite embedding" in one_sentence(capsys)


# ---------------------------------------------------------------- 3. item identity


def test_a_same_size_rewrite_with_the_mtime_kept_is_embedded_again(tmp_path):
    root = tmp_path / "images"
    write_folder(root)
    write_image(root / "cats" / "001.ppm", seed=1, suffix_format="PPM")  # fixed size: same bytes count
    assert extract_pixels(root) == 0
    path = root / "cats" / "001.ppm"
    stat = path.stat()
    rewritten = np.random.default_rng(99).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(rewritten).save(path, format="PPM")
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # touch -r
    assert extract_pixels(root) == 0
    store = Store.open(tmp_path / "store")
    assert store.manifest["embedded"] == 1
    assert extract_pixels(root, "fresh") == 0
    np.testing.assert_allclose(store.embeddings, Store.open(tmp_path / "fresh").embeddings, atol=1e-6)


# ---------------------------------------------------------------- 6. files opened once; run.dir outside the collection


def test_a_link_retargeted_outside_after_listing_is_not_read(tmp_path, monkeypatch):
    import simsearch.data.collections as collections

    root = tmp_path / "images"
    write_folder(root)
    write_image(tmp_path / "outside" / "secret.png", seed=42)
    link = root / "cats" / "link.png"
    link.symlink_to(root / "cats" / "000.png")  # inside the root when listed
    listed = collections.list_image_files

    def list_then_retarget(folder):
        result = listed(folder)
        link.unlink()
        link.symlink_to(tmp_path / "outside" / "secret.png")
        return result

    monkeypatch.setattr(collections, "list_image_files", list_then_retarget)
    assert extract_pixels(root) == 0
    skipped = {s["path"]: s["reason"] for s in read_jsonl(tmp_path / "store" / "skipped.jsonl")}
    assert "outside data.root" in skipped["cats/link.png"]
    assert "cats/link.png" not in {item["path"] for item in Store.open(tmp_path / "store").items}


def test_the_server_never_serves_a_link_retargeted_after_its_root_check(tmp_path, monkeypatch):
    """The thumbnail route checks the path, then opens it: a link swapped in between is refused on opening."""
    pytest.importorskip("fastapi")
    import simsearch.items as items
    from tests.helpers import client_for

    root = tmp_path / "images"
    write_folder(root)
    link = root / "cats" / "link.png"
    link.symlink_to(root / "cats" / "000.png")
    assert extract_pixels(root) == 0
    write_image(tmp_path / "outside" / "secret.png", seed=42)
    checked = items.ItemImages.path_of

    def check_then_retarget(self, row):  # the root check passes, then the link moves outside
        path = checked(self, row)
        if path is not None and path.name == "000.png" and self.store.items[row]["path"] == "cats/link.png":
            link.unlink()
            link.symlink_to(tmp_path / "outside" / "secret.png")
            return link
        return path

    monkeypatch.setattr(items.ItemImages, "path_of", check_then_retarget)
    with client_for(tmp_path / "store") as client:
        response = client.get("/items/cats/link.png/image")
    assert response.status_code == 200 and "outside data.root" in response.headers["x-simsearch-unavailable"]


def test_a_run_dir_inside_the_collection_is_refused(tmp_path, capsys):
    root = tmp_path / "images"
    write_folder(root)
    for run_dir in (root, root / "cats" / "out"):
        capsys.readouterr()
        assert extract_pixels(root, str(run_dir)) == 2
        assert "is inside data.root" in one_sentence(capsys)
    assert not (root / "cats" / "out").exists() and not (root / ".lock").exists()
    assert extract_pixels(root, str(root / ".simsearch")) == 0  # hidden: never listed
    assert extract_pixels(root, str(root / ".simsearch")) == 0 and len(Store.open(root / ".simsearch")) == 6


# ---------------------------------------------------------------- 9. the second probe: names, formats


def test_a_file_name_that_is_not_utf8_is_skipped_with_the_reason(tmp_path, caplog):
    root = tmp_path / "images"
    write_folder(root)
    bad_file = os.fsdecode(os.fsencode(root / "cats") + b"/caf\xe9.png")
    bad_folder = os.fsdecode(os.fsencode(root) + b"/d\xe9j\xe0")
    write_image(Path(bad_file), seed=50)
    write_image(Path(bad_folder) / "x.png", seed=51)
    assert extract_pixels(root) == 0
    assert len(Store.open(tmp_path / "store")) == 6
    skipped = {s["path_hex"]: s for s in read_jsonl(tmp_path / "store" / "skipped.jsonl")}
    assert set(skipped) == {b"cats/caf\xe9.png".hex(), b"d\xe9j\xe0".hex()}
    assert skipped[b"cats/caf\xe9.png".hex()]["path"] == "cats/caf\\xe9.png"
    assert all("not valid UTF-8" in s["reason"] for s in skipped.values())
    assert "2 of 8 inputs could not be read" in caplog.text


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 12 12\nnewpath 0 0 moveto 12 12 lineto stroke showpage\n"


def test_a_postscript_file_named_png_never_reaches_ghostscript(tmp_path, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    from PIL import EpsImagePlugin

    from tests.helpers import client_for

    ghostscript_runs = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ghostscript_runs.append(a) or no_space())
    root = tmp_path / "images"
    write_folder(root)
    (root / "cats" / "x.png").write_bytes(EPS)
    assert extract_pixels(root) == 0
    skipped = {s["path"]: s["reason"] for s in read_jsonl(tmp_path / "store" / "skipped.jsonl")}
    assert "not an image in a format simsearch reads" in skipped["cats/x.png"]
    capsys.readouterr()
    assert simsearch("search", "run.dir=store", f"query={root / 'cats' / 'x.png'}", "logger=none") == 2
    assert "not an image in a format simsearch reads" in one_sentence(capsys)
    with client_for(tmp_path / "store") as client:
        response = client.post("/search", files={"file": ("x.png", EPS, "image/png")}, data={"k": "2"})
    assert response.status_code == 400 and "not an image in a format simsearch reads" in response.json()["error"]
    assert ghostscript_runs == []
