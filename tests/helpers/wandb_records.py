"""Read back what wandb recorded in an offline run's `.wandb` file, so tests check wandb's own
record of a run rather than what we meant to send it (wandb ships no Python reader).

The file is a LevelDB-style log: a 7-byte header (b":W&B", magic, version), then 32 KiB blocks of
chunks `crc32 (4 bytes, LE) | length (2, LE) | type (1: full, 2: first, 3: middle, 4: last)` +
payload; the chunks of one record join into one `wandb_internal_pb2.Record`. The checksum is
zlib's CRC-32 of the type byte and the payload (checked against wandb 0.31's files; not CRC-32C).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

HEADER = 7
BLOCK = 32 * 1024
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb log"
    pos, parts = HEADER, b""
    while pos + CHUNK.size <= len(data):
        room = BLOCK - pos % BLOCK
        if room < CHUNK.size:  # a block's tail too short for a chunk header is padding
            pos += room
            continue
        crc, length, kind = CHUNK.unpack_from(data, pos)
        payload = data[pos + CHUNK.size:pos + CHUNK.size + length]
        if kind == 0 and length == 0:  # zero padding up to the end of a block
            pos += room
            continue
        assert zlib.crc32(bytes([kind]) + payload) == crc, f"{path}: bad checksum at byte {pos}"
        pos += CHUNK.size + length
        parts = payload if kind in (FULL, FIRST) else parts + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def history(path: Path) -> list[dict[str, Any]]:
    """The history rows wandb stored, in order: `{"_step": ..., key: value}`; nested keys joined by '/'."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) if item.nested_key else item.key: json.loads(item.value_json)
                   for item in record.history.item}
            rows.append(row)
    return rows


def run_records(path: Path) -> list[wandb_internal_pb2.RunRecord]:
    return [r.run for r in read_records(path) if r.WhichOneof("record_type") == "run"]


def summary(path: Path) -> dict[str, Any]:
    """The run's summary as the last summary records left it."""
    out: dict[str, Any] = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                out["/".join(item.nested_key) if item.nested_key else item.key] = json.loads(item.value_json)
    return out


def wandb_files(root: Path) -> list[Path]:
    """The offline wandb logs under `root` (WANDB_DIR when set: the `env` fixture's tmp_path; else the
    run dir), one per process that ran the run, in the order they started."""
    files = list((root / "wandb").glob("offline-run-*/run-*.wandb"))
    return sorted(files, key=lambda f: [(r.start_time.seconds, r.start_time.nanos) for r in run_records(f)])
