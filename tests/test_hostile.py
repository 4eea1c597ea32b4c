"""The holes a hostile probe found (issue 19), each tried again through the CLI, the Python API or HTTP:
blank images, formats not read, a tampered manifest, index or cache, a same-size rewrite, the lock,
full disks, swapped links, hostile values and the server's headers."""

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

import simsearch as api
from simsearch.errors import SimsearchError
from simsearch.files import read_jsonl
from simsearch.store import RunLock, Store
from tests.conftest import simsearch

PIXELS = ["model=pixels", "model.image_size=8", "logger=none", "trainer.enable_progress_bar=false",
          "trainer.accelerator=cpu", "data.num_workers=0"]


def write_image(path: Path, seed: int, suffix_format: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=suffix_format)


def write_folder(root: Path, per_class: int = 3) -> None:
    for number, label in enumerate(("cats", "dogs")):
        for i in range(per_class):
            write_image(root / label / f"{i:03d}.png", seed=10 * number + i)


def extract(root: Path, run_dir: str = "store", *extra: str) -> int:
    return simsearch("extract", "data=folder", f"data.root={root}", "data.batch_size=4", *PIXELS,
                     f"run.dir={run_dir}", *extra)


def one_sentence(capsys) -> str:
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    return error


# ---------------------------------------------------------------- 1. no zero vector, no file silently ignored


def test_blank_images_and_unread_files_are_in_skipped_jsonl(tmp_path):
    root = tmp_path / "images"
    write_folder(root)
    Image.new("RGB", (12, 12), (0, 0, 0)).save(root / "cats" / "black.png")  # raw pixels: a zero vector
    for name in ("photo.avif", "photo.heic", "photo.jfif", "drawing.svg", "notes.txt"):
        (root / "dogs" / name).write_bytes(b"not read")
    (root / "dogs" / "folder.png").mkdir()
    os.mkfifo(root / "dogs" / "pipe.png")
    assert extract(root) == 0
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
    assert extract(root) == 0
    Image.new("RGBA", (12, 12), (0, 0, 0, 255)).save(tmp_path / "blank.png")
    capsys.readouterr()
    assert simsearch("search", "run.dir=store", "query=blank.png", "logger=none") == 2
    assert "zero or non-finite embedding" in one_sentence(capsys)


def test_a_blank_upload_is_a_400_with_the_reason(tmp_path):
    pytest.importorskip("fastapi")
    from tests.test_serve import client_for, png_bytes

    root = tmp_path / "images"
    write_folder(root)
    assert extract(root) == 0
    with client_for(tmp_path / "store") as client:
        response = client.post("/search", files={"file": ("blank.png", png_bytes(Image.new("RGB", (12, 12))), "image/png")},
                               data={"k": "3"})
    assert response.status_code == 400 and "zero or non-finite embedding" in response.json()["error"]


# ---------------------------------------------------------------- 2. the manifest, the index and the cache protected


@pytest.fixture
def store_dir(tmp_path) -> Path:
    root = tmp_path / "images"
    write_folder(root)
    assert extract(root) == 0
    return tmp_path / "store"


def test_a_read_mid_swap_through_the_api_is_refused(store_dir, tmp_path):
    """A kill between moving embeddings.npy and the manifest: the API refuses, as the CLI does."""
    other = tmp_path / "images2"
    write_folder(other, per_class=4)
    assert extract(other, "store2") == 0
    os.replace(tmp_path / "store2" / "embeddings.npy", store_dir / "embeddings.npy")
    with pytest.raises(SimsearchError, match="embeddings.npy does not match its checksum"):
        api.open(store_dir)


@pytest.mark.parametrize("edit", [
    lambda m: m["data"].update(root="/"),
    lambda m: m["data"]["classes"].reverse(),
    lambda m: m.update(image_size=9),
    lambda m: m.update(dim=7),
])
def test_any_change_to_the_manifest_is_refused_with_a_sentence(store_dir, edit, capsys):
    path = store_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))
    capsys.readouterr()
    assert simsearch("eval", f"run.dir={store_dir}", "logger=none") == 2
    assert "does not match its own checksum" in one_sentence(capsys)
    with pytest.raises(SimsearchError, match="does not match its own checksum"):
        api.open(store_dir, verify=False)


def test_a_bit_flipped_anywhere_in_the_manifest_is_one_sentence(store_dir, capsys):
    path = store_dir / "manifest.json"
    original = path.read_bytes()
    for position in range(0, len(original), max(1, len(original) // 60)):
        flipped = bytearray(original)
        flipped[position] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(SimsearchError):
            Store.open(store_dir, verify=False)
    path.write_bytes(original)
    Store.open(store_dir)


def test_a_row_copied_inside_the_index_is_never_used(store_dir, caplog):
    assert simsearch("index", f"run.dir={store_dir}") == 0
    path = store_dir / "index.faiss"
    original = path.read_bytes()
    dim = Store.open(store_dir).dim
    row = dim * 4
    data = bytearray(original)
    data[-2 * row:-row] = data[-row:]  # the last vector over the one before it (flat codes end the file)
    path.write_bytes(bytes(data))
    assert simsearch("search", f"run.dir={store_dir}", "query=cats/001.png", "search.k=2", "logger=none") == 0
    assert "does not match its checksum in index.json" in caplog.text
    assert path.read_bytes() == original  # rebuilt


def test_an_index_of_another_store_is_rebuilt(store_dir, tmp_path, caplog):
    assert simsearch("index", f"run.dir={store_dir}") == 0
    info = json.loads((store_dir / "index.json").read_text())
    info["store_manifest_sha256"] = "0" * 64
    (store_dir / "index.json").write_text(json.dumps(info))
    assert simsearch("search", f"run.dir={store_dir}", "query=0", "search.k=2", "logger=none") == 0
    assert "built from another store" in caplog.text


def test_a_flip_with_the_mtime_put_back_is_refused(store_dir, monkeypatch):
    import simsearch.store.verification as store_module

    monkeypatch.setattr(store_module, "RACY_NS", 0)  # as if the store were written a while ago
    Store.open(store_dir)  # verified and cached
    time.sleep(0.01)
    path = store_dir / "labels.npy"
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(SimsearchError, match="labels.npy does not match its checksum"):
        api.open(store_dir)


def test_verify_full_hashes_every_file_again(store_dir, monkeypatch):
    import simsearch.store.verification as store_module

    monkeypatch.setattr(store_module, "RACY_NS", 0)
    Store.open(store_dir)
    hashed = []
    real = store_module.sha256_of
    monkeypatch.setattr(store_module, "sha256_of", lambda path: hashed.append(path.name) or real(path))
    api.open(store_dir)
    assert hashed == []
    api.open(store_dir, verify="full")
    assert sorted(hashed) == sorted(Store.open(store_dir).manifest["sha256"])


def test_a_flipped_npy_header_byte_is_one_sentence(store_dir):
    path = store_dir / "labels.npy"
    data = bytearray(path.read_bytes())
    data[data.index(b"'descr'")] = ord("(")  # the header's dict no longer parses
    path.write_bytes(bytes(data))
    with pytest.raises(SimsearchError, match="cannot be read"):
        api.open(store_dir, verify=False)
    with pytest.raises(SimsearchError, match="labels.npy does not match"):
        api.open(store_dir)


# ---------------------------------------------------------------- 3. item identity


def test_a_same_size_rewrite_with_the_mtime_kept_is_embedded_again(tmp_path):
    root = tmp_path / "images"
    write_folder(root)
    write_image(root / "cats" / "001.ppm", seed=1, suffix_format="PPM")  # fixed size: same bytes count
    assert extract(root) == 0
    path = root / "cats" / "001.ppm"
    stat = path.stat()
    rewritten = np.random.default_rng(99).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(rewritten).save(path, format="PPM")
    assert path.stat().st_size == stat.st_size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # touch -r
    assert extract(root) == 0
    store = Store.open(tmp_path / "store")
    assert store.manifest["embedded"] == 1
    assert extract(root, "fresh") == 0
    np.testing.assert_allclose(store.embeddings, Store.open(tmp_path / "fresh").embeddings, atol=1e-6)


# ---------------------------------------------------------------- 4. one run per run.dir


def test_a_held_lock_refuses_a_second_run_with_a_sentence(store_dir, tmp_path, capsys):
    manifest = (store_dir / "manifest.json").read_bytes()
    with RunLock(store_dir):
        capsys.readouterr()
        assert extract(tmp_path / "images") == 2
        assert "another run (pid" in one_sentence(capsys)
    assert (store_dir / "manifest.json").read_bytes() == manifest and not (store_dir / ".lock").exists()


def test_the_lock_file_of_a_dead_run_does_not_block(store_dir, tmp_path):
    (store_dir / ".lock").write_text(json.dumps({"pid": 2**22 + 7, "host": "elsewhere", "started": "then"}))
    assert extract(tmp_path / "images") == 0


RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from simsearch.errors import SimsearchError
    from simsearch.store import RunLock
    run_dir, start, log = Path(sys.argv[1]), float(sys.argv[2]), Path(sys.argv[3])
    time.sleep(max(0.0, start - time.time()))
    try:
        with RunLock(run_dir):
            with open(log, "a") as handle:
                handle.write(f"in {time.monotonic_ns()}\\n")
            time.sleep(0.02)
            with open(log, "a") as handle:
                handle.write(f"out {time.monotonic_ns()}\\n")
    except SimsearchError:
        pass
""")


@pytest.mark.slow
def test_two_processes_racing_for_the_lock_never_both_hold_it(tmp_path):
    import socket

    script = tmp_path / "racer.py"
    script.write_text(RACER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for trial in range(60):
        run_dir, log = tmp_path / f"run{trial}", tmp_path / f"log{trial}"
        run_dir.mkdir()
        if trial % 2:  # a dead run's lock file left behind on this host
            (run_dir / ".lock").write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname(), "started": "then"}))
        start = time.time() + 0.6
        racers = [subprocess.Popen([sys.executable, str(script), str(run_dir), str(start), str(log)], env=env,
                                   stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for racer in racers:
            assert racer.wait(timeout=60) == 0, racer.stderr.read()
        events = log.read_text().split() if log.exists() else []
        kinds = events[0::2]
        assert kinds and all(kinds[i] == "in" and kinds[i + 1] == "out" for i in range(0, len(kinds), 2)), events


# ---------------------------------------------------------------- 7. hostile values: one sentence, exit 2, nothing created

LONG = "a" * 5000


@pytest.mark.parametrize("arguments, words", [
    (["eval", "eval.k=${oc.env:HOME}"], "eval.k"),
    (["extract", f"run.dir={LONG}"], "run.dir is too long"),
    (["extract", "data=folder", f"data.root={LONG}", "run.dir=new"], "data.root is too long"),
    (["search", f"query={LONG}"], "search.query is too long"),
    (["eval", "run.seed=-1", "eval.queries=3"], "run.seed=-1"),
    (["search", "query=0", "search.k=2", "search.grid=missing/x.png"], "No such file or directory"),
    (["duplicates", "duplicates.output=missing/d.json"], "No such file or directory"),
    (["serve", "serve.port=70000"], "serve.port=70000"),
    (["extract", "trainer.precision=bad", "run.dir=new"], "trainer.precision=bad"),
    (["extract", "trainer.accelerator=tpu", "run.dir=new"], "trainer.accelerator=tpu"),
    (["extract", "run.dir="], "run.dir= is empty"),
    (["extract", "data=folder", "data.root=missing", "run.dir=new"], "missing"),
    (["extract", "data.num_items=100000000000000000000", "run.dir=new"], "data.num_items=100000000000000000000"),
    (["extract", "run.seed=100000000000000000000", "run.dir=new"], "run.seed=100000000000000000000 is out of range"),
    (["extract", "run.seed=4294967296", "run.dir=new"], "at most 4294967295"),
    (["extract", "data.batch_size=100000000000", "run.dir=new"], "data.batch_size=100000000000 is out of range"),
    (["extract", "model.image_size=100000", "run.dir=new"], "model.image_size=100000 is out of range"),
    (["serve", "serve.max_upload_mb=1e309"], "serve.max_upload_mb=inf is not a finite number"),
    (["extract", "model.mean=[nan,0.5,0.5]", "run.dir=new"], "model.mean[0]=nan is not a finite number"),
    (["extract", "model.std=[0.2,inf,0.2]", "run.dir=new"], "model.std[1]=inf is not a finite number"),
    (["extract", "model.std=[0.2,0,0.2]", "run.dir=new"], "model.std=[0.2, 0.0, 0.2] must be positive"),
    (["serve", "serve.upload_timeout_s=1e309"], "serve.upload_timeout_s=inf is not a finite number"),
    (["serve", "serve.upload_timeout_s=1e9"], "serve.upload_timeout_s=1000000000.0 is out of range"),
    (["serve", "serve.header_timeout_s=0"], "serve.header_timeout_s=0.0 must be a positive number"),
    (["serve", "serve.host=no-such-host.invalid"], "serve.host=no-such-host.invalid cannot be resolved"),
    (["serve", "serve.allowed_hosts=[photos.lan:80:x]"], "serve.allowed_hosts holds 'photos.lan:80:x'"),
    (["serve", "serve.allowed_hosts=[a b]"], "serve.allowed_hosts holds 'a b'"),
    (["extract", f"trainer.devices={4 * (os.cpu_count() or 1) + 1}", "run.dir=new"], "(at most 4 per core)"),
])
def test_hostile_values_are_one_sentence_and_create_nothing(store_dir, tmp_path, arguments, words, capsys):
    command, *rest = arguments
    run_dir = [] if any(a.startswith("run.dir=") for a in rest) else [f"run.dir={store_dir}"]
    data = [] if command != "extract" or any(a.startswith("data=") for a in rest) else ["data=synthetic"]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    assert simsearch(command, *data, *PIXELS, *run_dir, *rest) == 2
    assert words in one_sentence(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run.dir made
    assert not [p.name for p in store_dir.iterdir() if ".tmp" in p.name]  # no temporary file left


@pytest.mark.parametrize("key", ["run.dir", "query", "data.root", "search.grid"])
def test_keys_taken_as_typed_are_never_interpolated(key):
    from simsearch.config import load_config

    cfg = load_config(["data=folder", "data.root=images", f"{key}=x${{oc.env:HOME}}${{run.seed}}.png"])
    value = OmegaConf.select(cfg, "search.query" if key == "query" else key)
    assert value == "x${oc.env:HOME}${run.seed}.png"


# ---------------------------------------------------------------- 8. the server: headers, Host, paths, slow uploads


def test_every_answer_has_the_security_headers_and_the_page_satisfies_its_csp(store_dir):
    pytest.importorskip("fastapi")
    import base64
    import hashlib
    import re

    from tests.test_serve import client_for

    with client_for(store_dir) as client:
        page = client.get("/")
        for response in (page, client.get("/health"), client.get("/items/nothing"), client.get("/search?item=0&k=2")):
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["x-frame-options"] == "DENY"
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    csp = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and "'unsafe-inline'" not in csp["script-src"]
    assert "'self'" in csp["script-src"] and "'self'" in csp["style-src"]  # the page's /static/app.js and app.css
    for script in re.findall(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", page.text, re.S):  # inline ones
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp["script-src"]
    for style in re.findall(r"<style[^>]*>(.*?)</style>", page.text, re.S) + re.findall(r'\sstyle="([^"]*)"', page.text):
        digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp["style-src"]


@pytest.mark.parametrize("host, status", [
    ("localhost", 200), ("127.0.0.1:8000", 200), ("[::1]:8000", 200), ("photos.lan", 200), ("[::1]", 200),
    ("evil.example", 400), ("127.0.0.1.evil.example", 400), ("", 400),
    ("localhost:80:evil", 400), ("localhost:abc", 400), ("localhost evil", 400), ("[::1]x", 400), ("[::1]:80:1", 400),
    ("::1", 400), ("localhost:123456", 400), ("photos.lan@evil.example", 400),
])
def test_only_allowed_hosts_are_answered(store_dir, host, status):
    pytest.importorskip("fastapi")
    from tests.test_serve import client_for

    with client_for(store_dir, "serve.allowed_hosts=[photos.lan]") as client:
        response = client.get("/health", headers={"host": host})
    assert response.status_code == status
    if status == 400:
        assert "serve.allowed_hosts" in response.json()["error"]


def test_no_absolute_path_of_the_machine_in_any_answer(store_dir, tmp_path):
    pytest.importorskip("fastapi")
    from tests.test_serve import client_for

    outside = tmp_path / "secret"
    write_image(outside / "x.png", seed=3)
    (tmp_path / "images" / "cats" / "000.png").unlink()
    (tmp_path / "images" / "cats" / "000.png").symlink_to(outside / "x.png")
    with client_for(store_dir) as client:
        answers = [client.get("/openapi.json"), client.get("/items/cats/000.png/image"), client.get("/items/%2Fetc%2Fpasswd"),
                   client.get("/health")]
    assert answers[1].status_code == 403
    for response in answers:
        text = response.text + json.dumps(dict(response.headers))
        assert str(tmp_path) not in text and "/root" not in text and "/tmp" not in text, text[:300]


def test_a_slow_upload_is_answered_408_within_the_time_limit(store_dir):
    pytest.importorskip("uvicorn")
    import socket

    from tests.test_serve import LiveServer

    with LiveServer(store_dir, "serve.upload_timeout_s=1") as url:
        port = int(url.rsplit(":", 1)[1])
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                               b"boundary=x\r\nContent-Length: 5000\r\n\r\n--x\r\n")
            answer = b""
            while chunk := connection.recv(65536):  # the server answers, then closes
                answer += chunk
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408") and b"serve.upload_timeout_s" in answer, answer[:200]
    assert elapsed < 5


# ---------------------------------------------------------------- 5. a full disk at every write


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def half_written(path_argument: int):
    """A writer that leaves part of its file, then finds the disk full."""
    def write(*args, **kwargs):
        Path(str(args[path_argument])).write_bytes(b"\0" * 10)
        no_space()
    return write


def full_disk_at(where: str, monkeypatch) -> list[str]:
    """Make the write at `where` fail with ENOSPC; returns the command that reaches it."""
    import faiss
    import PIL.Image

    import simsearch.extraction.assembly as assembly_module
    import simsearch.extraction.shards as shards_module
    import simsearch.store.lock as lock_module
    import simsearch.store.writer as writer_module

    extract_cmd = ["extract", "data=folder", "data.root=images", "data.batch_size=4", *PIXELS]
    if where == "lock":
        monkeypatch.setattr(lock_module, "_write_owner", no_space)
    elif where == "shards":
        monkeypatch.setattr(shards_module, "save_file", lambda tensors, path, metadata: half_written(0)(path))
    elif where == "staging space":
        monkeypatch.setattr(assembly_module.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    elif where == "staging":
        monkeypatch.setattr(assembly_module.os, "posix_fallocate", no_space)
    elif where == "items":
        monkeypatch.setattr(writer_module, "write_jsonl", half_written(0))
    elif where == "swap":
        monkeypatch.setattr(writer_module, "fsync_path", no_space)
    elif where == "index":
        def write_index(index, path):
            Path(path).write_bytes(b"\0" * 10)
            raise RuntimeError("Error in faiss::FileIOWriter: fwrite failed: No space left on device")
        monkeypatch.setattr(faiss, "write_index", write_index)
        return ["index"]
    elif where == "grid":
        monkeypatch.setattr(PIL.Image.Image, "save", lambda self, path, *a, **k: half_written(0)(path))
        return ["search", "query=0", "search.k=2"]
    elif where == "metrics":
        monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: half_written(0)(self))
        return ["eval", "eval.k=[1]"]
    return extract_cmd


@pytest.mark.parametrize("where", ["lock", "shards", "staging space", "staging", "items", "swap", "index", "grid",
                                   "metrics"])
def test_a_full_disk_at_any_write_is_one_sentence_and_keeps_the_store(store_dir, tmp_path, where, monkeypatch, capsys):
    write_image(tmp_path / "images" / "cats" / "new.png", seed=77)  # something to embed
    manifest = (store_dir / "manifest.json").read_bytes()
    command = full_disk_at(where, monkeypatch)
    capsys.readouterr()
    assert simsearch(*command, "run.dir=store", "logger=none") == 2
    error = one_sentence(capsys)
    assert "space" in error, error
    monkeypatch.undo()
    assert (store_dir / "manifest.json").read_bytes() == manifest
    assert len(Store.open(store_dir)) == 6
    left = [p.name for p in store_dir.rglob("*") if ".tmp" in p.name or p.name in (".staging", ".lock")]
    assert left == []


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
    assert extract(root) == 0
    skipped = {s["path"]: s["reason"] for s in read_jsonl(tmp_path / "store" / "skipped.jsonl")}
    assert "outside data.root" in skipped["cats/link.png"]
    assert "cats/link.png" not in {item["path"] for item in Store.open(tmp_path / "store").items}


def test_the_server_never_serves_a_link_retargeted_after_its_root_check(tmp_path, monkeypatch):
    """The thumbnail route checks the path, then opens it: a link swapped in between is refused on opening."""
    pytest.importorskip("fastapi")
    import simsearch.items as items
    from tests.test_serve import client_for

    root = tmp_path / "images"
    write_folder(root)
    link = root / "cats" / "link.png"
    link.symlink_to(root / "cats" / "000.png")
    assert extract(root) == 0
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
        assert extract(root, str(run_dir)) == 2
        assert "is inside data.root" in one_sentence(capsys)
    assert not (root / "cats" / "out").exists() and not (root / ".lock").exists()
    assert extract(root, str(root / ".simsearch")) == 0  # hidden: never listed
    assert extract(root, str(root / ".simsearch")) == 0 and len(Store.open(root / ".simsearch")) == 6


# ---------------------------------------------------------------- 9. the second probe: pipes, JSON, the cache, names, formats


def finished_within(seconds: float, function):
    """`function()`'s result (or its exception), failing the test if it is still running after `seconds`:
    a reader blocked on a named pipe must not hang the test suite."""
    import threading

    outcome: dict = {}

    def run():
        try:
            outcome["value"] = function()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.mark.parametrize("name", ["embeddings.npy", "labels.npy", "items.jsonl", "manifest.json"])
@pytest.mark.parametrize("verify", [True, False])
def test_a_pipe_in_place_of_a_store_file_is_one_sentence(store_dir, name, verify):
    (store_dir / name).unlink()
    os.mkfifo(store_dir / name)
    with pytest.raises(SimsearchError, match="is not a regular file"):
        finished_within(10, lambda: api.open(store_dir, verify=verify).items)


def test_a_pipe_in_place_of_the_verification_cache_is_ignored(store_dir):
    (store_dir / ".verified.json").unlink(missing_ok=True)
    os.mkfifo(store_dir / ".verified.json")
    assert len(finished_within(10, lambda: api.open(store_dir))) == 6


DEEP = "[" * 100_000 + "]" * 100_000


def test_deeply_nested_json_in_a_store_file_is_one_sentence(store_dir, capsys, caplog):
    manifest = (store_dir / "manifest.json").read_text()
    (store_dir / "manifest.json").write_text(DEEP)
    with pytest.raises(SimsearchError, match="nested too deeply"):
        api.open(store_dir)
    (store_dir / "manifest.json").write_text(manifest)
    (store_dir / ".verified.json").write_text(DEEP)
    assert len(api.open(store_dir)) == 6  # the cache ignored: files hashed again
    assert simsearch("index", f"run.dir={store_dir}") == 0
    (store_dir / "index.json").write_text(DEEP)
    capsys.readouterr()
    assert simsearch("search", f"run.dir={store_dir}", "query=0", "search.k=2", "logger=none") == 0
    assert "index.json" in caplog.text and "rebuilding" in caplog.text
    (store_dir / "items.jsonl").write_text(DEEP + "\n")
    resign_manifest(store_dir, "items.jsonl")  # a consistent forgery: only the JSON's depth is left to refuse
    with pytest.raises(SimsearchError, match="items.jsonl is damaged: line 1"):
        _ = api.open(store_dir).items


def resign_manifest(store_dir: Path, name: str) -> None:
    """The manifest rewritten with the checksum of `name` as it is now, and its own checksum recomputed."""
    import hashlib

    manifest = json.loads((store_dir / "manifest.json").read_text())
    manifest["sha256"][name] = hashlib.sha256((store_dir / name).read_bytes()).hexdigest()
    content = {key: value for key, value in manifest.items() if key != "manifest_sha256"}
    canonical = json.dumps(content, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode()
    manifest["manifest_sha256"] = hashlib.sha256(canonical).hexdigest()
    (store_dir / "manifest.json").write_text(json.dumps(manifest))


def test_a_key_given_twice_in_a_store_file_is_refused(store_dir, caplog):
    path = store_dir / "manifest.json"
    original = path.read_text()
    path.write_text('{"count": 999999,' + original.lstrip()[1:])  # json.loads would keep the last count
    with pytest.raises(SimsearchError, match="'count' appears twice"):
        api.open(store_dir)
    path.write_text(original)
    assert simsearch("index", f"run.dir={store_dir}") == 0
    info = (store_dir / "index.json").read_text()
    (store_dir / "index.json").write_text('{"factory": "HNSW32",' + info.lstrip()[1:])
    assert simsearch("search", f"run.dir={store_dir}", "query=0", "search.k=2", "logger=none") == 0
    assert "index.json" in caplog.text and "rebuilding" in caplog.text


def test_a_forged_verification_cache_is_never_trusted(store_dir, monkeypatch):
    """A byte of labels.npy flipped, then .verified.json edited to the file's new identity, verified
    'later': without the user's key the entry's MAC fails, so the file is hashed again and refused."""
    import simsearch.store.verification as store_module

    monkeypatch.setattr(store_module, "RACY_NS", 0)
    api.open(store_dir)  # verified and cached
    path = store_dir / "labels.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    stat = path.stat()
    cache = json.loads((store_dir / ".verified.json").read_text())
    entries = cache.get("files", cache)
    entries["labels.npy"].update(dev=stat.st_dev, ino=stat.st_ino, size=stat.st_size, mtime_ns=stat.st_mtime_ns,
                                 ctime_ns=stat.st_ctime_ns, verified_ns=time.time_ns() + 10**10)
    (store_dir / ".verified.json").write_text(json.dumps(cache))
    with pytest.raises(SimsearchError, match="labels.npy does not match its checksum"):
        api.open(store_dir)
    key = Path(os.environ["XDG_CACHE_HOME"]) / "simsearch" / "verify.key"  # the user's, outside the store
    assert key.stat().st_mode & 0o777 == 0o600 and not key.is_relative_to(store_dir)


def test_a_file_name_that_is_not_utf8_is_skipped_with_the_reason(tmp_path, caplog):
    root = tmp_path / "images"
    write_folder(root)
    bad_file = os.fsdecode(os.fsencode(root / "cats") + b"/caf\xe9.png")
    bad_folder = os.fsdecode(os.fsencode(root) + b"/d\xe9j\xe0")
    write_image(Path(bad_file), seed=50)
    write_image(Path(bad_folder) / "x.png", seed=51)
    assert extract(root) == 0
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

    from tests.test_serve import client_for

    ghostscript_runs = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ghostscript_runs.append(a) or no_space())
    root = tmp_path / "images"
    write_folder(root)
    (root / "cats" / "x.png").write_bytes(EPS)
    assert extract(root) == 0
    skipped = {s["path"]: s["reason"] for s in read_jsonl(tmp_path / "store" / "skipped.jsonl")}
    assert "not an image in a format simsearch reads" in skipped["cats/x.png"]
    capsys.readouterr()
    assert simsearch("search", "run.dir=store", f"query={root / 'cats' / 'x.png'}", "logger=none") == 2
    assert "not an image in a format simsearch reads" in one_sentence(capsys)
    with client_for(tmp_path / "store") as client:
        response = client.post("/search", files={"file": ("x.png", EPS, "image/png")}, data={"k": "2"})
    assert response.status_code == 400 and "not an image in a format simsearch reads" in response.json()["error"]
    assert ghostscript_runs == []


# ---------------------------------------------------------------- 10. the second probe: queries, the API, outputs


def test_a_query_that_is_a_pipe_a_device_or_empty_gets_its_own_sentence(store_dir, tmp_path, capsys):
    os.mkfifo(tmp_path / "pipe.png")
    for query, words in ((str(tmp_path / "pipe.png"), "is not a regular file"), ("/dev/null", "is not a regular file"),
                         ("", "the query is empty"), (str(tmp_path), "is a folder")):
        capsys.readouterr()
        assert finished_within(20, lambda: simsearch("search", f"run.dir={store_dir}", f"query={query}",
                                                     "logger=none")) == 2
        assert words in one_sentence(capsys)
    with pytest.raises(SimsearchError, match="the query is empty"):
        api.open(store_dir).search("")


def test_an_empty_image_or_a_complex_vector_is_one_sentence(store_dir):
    store = api.open(store_dir)
    with pytest.raises(SimsearchError, match="the query image is empty"):
        store.search(Image.new("RGB", (0, 0)))
    with pytest.raises(SimsearchError, match="real numbers, not complex"):
        store.search(np.ones(store.dim) * 1j)


@pytest.mark.parametrize("k", [True, 2.5, "3", None])
def test_the_api_refuses_a_k_that_is_not_a_whole_number(store_dir, k):
    store = api.open(store_dir)
    with pytest.raises(SimsearchError, match="must be a whole number"):
        store.search(0, k=k)
    with pytest.raises(SimsearchError, match="must be a whole number"):
        store.search(np.ones(store.dim), k=k)


def test_a_query_vector_of_huge_finite_values_is_searched(store_dir):
    store = api.open(store_dir)
    direction = Store.open(store_dir).vectors()[3]
    huge_values = (direction.astype(np.float64) * (1e38 / float(np.abs(direction).max()))).astype(np.float32)
    with np.errstate(over="ignore"):  # float32's norm of it overflows
        assert np.isfinite(huge_values).all() and not np.isfinite(np.linalg.norm(huge_values))
    huge = [r.id for r in store.search(huge_values, k=3)]
    assert huge == [r.id for r in store.search(direction, k=3)] and huge[0] == store.items[3]["id"]
    assert [r.id for r in store.search([1e300] * store.dim, k=2)] == [r.id for r in store.search([1.0] * store.dim, k=2)]


def test_an_unverified_open_never_serves_a_non_finite_row(store_dir):
    path = store_dir / "embeddings.npy"
    embeddings = np.load(path)
    embeddings[4, 1] = np.nan
    np.save(path, embeddings)
    with pytest.raises(SimsearchError, match="row 4 of embeddings.npy is not finite"):
        api.open(store_dir, verify=False)
    with pytest.raises(SimsearchError, match="embeddings.npy does not match its checksum"):
        api.open(store_dir)
    from simsearch.store import create_store

    with pytest.raises(SimsearchError, match="NaN or infinite"):
        create_store(store_dir.parent / "nan", embeddings, np.zeros(len(embeddings), np.int64),
                     [{"id": str(i)} for i in range(len(embeddings))], {"data": {}, "model": {}})
    assert not (store_dir.parent / "nan").exists()


@pytest.mark.parametrize("command, key, name", [
    (["search", "query=0", "search.k=2"], "search.grid", "grid.png"), (["duplicates"], "duplicates.output", "d.json"),
    (["duplicates"], "duplicates.image", "d.png"), (["map"], "map.image", "map.png"),
])
def test_an_output_inside_the_collection_is_refused(store_dir, tmp_path, command, key, name, capsys):
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "images").rglob("*"))
    for value in (f"../images/cats/{name}", str(tmp_path / "images" / name)):
        capsys.readouterr()
        assert simsearch(*command, f"run.dir={store_dir}", f"{key}={value}", "logger=none") == 2
        assert "is inside data.root" in one_sentence(capsys)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "images").rglob("*")) == before
    if key == "search.grid":  # a hidden folder in the collection is never listed: allowed, as for run.dir
        (tmp_path / "images" / ".simsearch").mkdir()
        assert simsearch(*command, f"run.dir={store_dir}", f"{key}=../images/.simsearch/grid.png", "logger=none") == 0
        assert (tmp_path / "images" / ".simsearch" / "grid.png").is_file()


# ---------------------------------------------------------------- 11. the second probe: the server's connections, the cwd


class Served:
    """The app of `simsearch serve` under the uvicorn configuration `simsearch serve` runs (`server_config`),
    on a free port of 127.0.0.1, in a thread."""

    def __init__(self, store_dir: Path, *overrides: str):
        import threading

        import uvicorn

        from simsearch.config import load_config
        from simsearch.server.app import create_app, server_config
        from tests.test_serve import free_port

        cfg = load_config([f"run.dir={store_dir}", "logger=none", "serve.device=cpu", f"serve.port={free_port()}",
                           *overrides])
        self.port = cfg.serve.port
        self.server = uvicorn.Server(server_config(create_app(cfg), cfg, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> int:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        return self.port

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_request_headers_sent_a_byte_at_a_time_are_cut_off(store_dir):
    pytest.importorskip("uvicorn")
    import socket

    with Served(store_dir, "serve.header_timeout_s=1") as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:  # a well-behaved client
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert connection.recv(65536).startswith(b"HTTP/1.1 200")
        for request_line in (b"", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"):  # new, then kept alive
            with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                if request_line:
                    connection.sendall(request_line)
                    assert connection.recv(65536).startswith(b"HTTP/1.1 200")
                started, closed = time.monotonic(), None
                for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
                    try:
                        connection.sendall(bytes([byte]))
                        connection.settimeout(0.2)
                        if connection.recv(1024) == b"":
                            closed = time.monotonic() - started
                            break
                    except TimeoutError:
                        continue
                    except (BrokenPipeError, ConnectionResetError):
                        closed = time.monotonic() - started
                        break
                assert closed is not None and closed < 2.5, closed


def test_an_unresolvable_host_is_refused_before_the_model_is_loaded(store_dir, capsys, monkeypatch):
    import simsearch.stages.serve as serve_module

    monkeypatch.setattr(serve_module, "create_app", lambda cfg: pytest.fail("the app was built"))
    capsys.readouterr()
    assert simsearch("serve", f"run.dir={store_dir}", "serve.host=no-such-host.invalid", "logger=none") == 2
    assert "cannot be resolved" in one_sentence(capsys)


@pytest.mark.slow
def test_a_run_writes_nothing_in_the_current_folder(store_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert simsearch("search", f"run.dir={store_dir}", "query=0", "search.k=2", "logger=wandb",
                     "logger.wandb.mode=offline") == 0
    assert list(cwd.iterdir()) == []
    assert list((store_dir / "wandb").glob("offline-run-*"))


def test_a_port_already_taken_is_one_sentence(store_dir, capsys):
    pytest.importorskip("uvicorn")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        capsys.readouterr()
        assert simsearch("serve", f"run.dir={store_dir}", f"serve.port={taken.getsockname()[1]}", "logger=none",
                         "serve.device=cpu") == 2
    error = capsys.readouterr().err
    assert "simsearch serve: error: cannot serve on 127.0.0.1" in error and "Traceback" not in error
