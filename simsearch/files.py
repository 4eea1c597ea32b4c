"""Files written so that a run killed at any moment leaves either the old file or the new one, never
half of one; and the checksums and identities that readers compare files against."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from simsearch.errors import SimsearchError


def sha256_of(path: Path, block_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        while block := handle.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading, refused (one sentence) unless what was opened is a regular file: opened
    without blocking and checked after opening, so a named pipe put in a file's place never hangs a reader."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SimsearchError(f"{path} is not a regular file (a pipe, socket, device or folder): not read; "
                                 "put the file back or extract the store again")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key[:100]!r} appears twice")
        result[key] = value
    return result


def parse_json(data: str | bytes, path: Path) -> Any:
    """JSON of a file simsearch wrote, strictly: a key given twice (which json.loads would silently take the
    last of) or nesting too deep to parse is refused with one sentence, like any other damage."""
    try:
        return json.loads(data, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise SimsearchError(f"{path} is damaged: its JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise SimsearchError(f"{path} is damaged: {str(error).splitlines()[0][:200]}") from None


def read_json(path: Path) -> Any:
    """A JSON file simsearch wrote (`parse_json`), read only if it is a regular file (`open_regular`)."""
    with open_regular(path) as handle:
        return parse_json(handle.read(), path)


def file_identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """Device, inode, size and mtime: a file replaced (os.replace) or rewritten since has another."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's: its entries, renames included) data to the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_beside(path: Path) -> Path:
    """Where the next version of `path` is written before it replaces it: the same folder (same file system),
    hidden, and with the same suffix (image writers choose their format by it)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")


def replace_atomically(path: Path, write: Any) -> None:
    """Call `write(temporary)` beside `path`, then rename it over `path`: a run killed mid-write leaves
    the old file whole, and a failed write (full disk, read-only folder) leaves no stray file."""
    temporary = temporary_beside(path)
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:  # named by the file meant, not by the temporary one
        temporary.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror or str(error), str(path)) from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    replace_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def write_json_atomically(path: Path, value: Any, indent: int = 2) -> None:
    write_text_atomically(path, json.dumps(value, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_jsonl(path: Path, sha256: str | None = None, handle: BinaryIO | None = None) -> list[dict[str, Any]]:
    """One dict per line of `path` (or of `handle`, an open file of it); with `sha256`, the bytes read
    must have that checksum (the file is the one the manifest describes, not one swapped in since)."""
    if handle is None:
        with open_regular(path) as opened:
            data = opened.read()
    else:
        data = handle.read()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise SimsearchError(f"{path} has changed since its store was opened (a new extraction?): open the store again")
    records = []
    for number, line in enumerate(data.split(b"\n"), start=1):  # only \n ends a line: ids may hold U+2028
        if not line.strip():
            continue
        try:
            record = parse_json(line, path)
        except SimsearchError:
            raise SimsearchError(f"{path} is damaged: line {number} is not a JSON object (or nests too deeply, "
                                 "or repeats a key)") from None
        if not isinstance(record, dict):
            raise SimsearchError(f"{path} is damaged: line {number} is not a JSON object")
        records.append(record)
    return records
