"""The holes a hostile probe found in the store (issue 19), each tried again through the CLI or the Python API:
a tampered manifest, index or cache, the lock, a full disk at every write, pipes and hostile JSON in place of
its files, and a non-finite row."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import simsearch as api
from simsearch.errors import SimsearchError
from simsearch.store import RunLock, Store
from tests.helpers import PIXELS, extract_pixels, finished_within, no_space, one_sentence, simsearch, write_folder, write_image

# ---------------------------------------------------------------- 2. the manifest, the index and the cache protected


def test_a_read_mid_swap_through_the_api_is_refused(store_dir, tmp_path):
    """A kill between moving embeddings.npy and the manifest: the API refuses, as the CLI does."""
    other = tmp_path / "images2"
    write_folder(other, per_class=4)
    assert extract_pixels(other, "store2") == 0
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


# ---------------------------------------------------------------- 4. one run per run.dir


def test_a_held_lock_refuses_a_second_run_with_a_sentence(store_dir, tmp_path, capsys):
    manifest = (store_dir / "manifest.json").read_bytes()
    with RunLock(store_dir):
        capsys.readouterr()
        assert extract_pixels(tmp_path / "images") == 2
        assert "another run (pid" in one_sentence(capsys)
    assert (store_dir / "manifest.json").read_bytes() == manifest and not (store_dir / ".lock").exists()


def test_the_lock_file_of_a_dead_run_does_not_block(store_dir, tmp_path):
    (store_dir / ".lock").write_text(json.dumps({"pid": 2**22 + 7, "host": "elsewhere", "started": "then"}))
    assert extract_pixels(tmp_path / "images") == 0


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


# ---------------------------------------------------------------- 5. a full disk at every write


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


# ---------------------------------------------------------------- 9. the second probe: pipes, JSON, the cache


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


# ---------------------------------------------------------------- 10. the second probe: a non-finite row


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
