"""Read the summary of an offline W&B run from its `.wandb` file (a LevelDB-style record log of protobufs).

wandb >= 0.19 no longer ships a Python reader; the format is small enough to read here, for tests only.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK_BYTES = 32 * 1024
RECORD_HEADER = struct.Struct("<IHB")  # crc32, length, type
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    position, chunks, result = 7, [], []
    while position + RECORD_HEADER.size <= len(data):
        left_in_block = BLOCK_BYTES - position % BLOCK_BYTES
        if left_in_block < RECORD_HEADER.size:
            position += left_in_block
            continue
        _, length, kind = RECORD_HEADER.unpack_from(data, position)
        payload = data[position + RECORD_HEADER.size : position + RECORD_HEADER.size + length]
        position += RECORD_HEADER.size + length
        if kind == 0 and length == 0:
            break
        chunks.append(payload)
        if kind in (FULL, LAST):
            result.append(b"".join(chunks))
            chunks = []
    return result


def complete_records(run_file: Path, wait_s: float = 60.0) -> list:
    """The run's records once its exit record is written: wandb's service process may still be writing
    the file for a moment after `run.finish()` returns (seen under load)."""
    import time

    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + wait_s
    while True:
        parsed = []
        for raw in records(run_file):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            parsed.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in parsed) or time.monotonic() > deadline:
            return parsed
        time.sleep(0.2)


def offline_summary(run_file: Path) -> dict:
    """Every summary key of the run, last value wins."""
    summary = {}
    for record in complete_records(run_file):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
    return summary
