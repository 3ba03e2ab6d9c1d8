"""A reader of W&B's offline run file (``run-<id>.wandb``), for the tests to check what W&B
itself recorded, not tokattr's own bookkeeping.

The file is a LevelDB-style log (the format of W&B's ``datastore``): a 7-byte header
(``":W&B"``, magic ``0xBEE1``, version 0), then 32 KiB blocks of chunks, each with a 7-byte
header (CRC-32, length, type: full, first, middle, last), a record split across blocks
being joined again; each record is a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def chunks(path: Path) -> Iterator[bytes]:
    """The records' bytes, joined across blocks, checksums checked."""
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left  # the block's zero padding
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        body = data[pos + HEADER : pos + HEADER + length]
        if length == 0 and kind == 0:
            break  # zero fill of a file still being written
        pos += HEADER + length
        crc = zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
        assert crc == checksum, "corrupt record"
        if kind == FULL:
            yield body
        elif kind == FIRST:
            pending = body
        elif kind == MIDDLE:
            pending += body
        elif kind == LAST:
            yield pending + body
            pending = b""


def records(path: Path) -> Iterator[Any]:
    """Every ``Record`` of the file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in chunks(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        yield rec


def run_file(run_dir: Path) -> Path:
    (path,) = Path(run_dir).glob("run-*.wandb")
    return path


def _put(target: dict[str, Any], item: Any) -> None:
    """Set an update item's value at its key path (``nested_key``, else ``key``)."""
    path = list(item.nested_key) or [item.key]
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = json.loads(item.value_json)


def read_run(run_dir: Path) -> dict[str, Any]:
    """What an offline run holds: ``run_id``, ``history`` (one dict per row), ``summary``
    (the last value per key), ``config``, ``files`` (paths saved); values decoded, a nested
    key as nested dicts under its first part (``summary["metrics"]["_type"]``)."""
    out: dict[str, Any] = {"run_id": None, "history": [], "summary": {}, "config": {},
                           "files": []}  # fmt: skip
    for rec in records(run_file(run_dir)):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = rec.run.run_id
            for item in rec.run.config.update:
                _put(out["config"], item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                _put(row, item)
            out["history"].append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                _put(out["summary"], item)
        elif kind == "config":
            for item in rec.config.update:
                _put(out["config"], item)
        elif kind == "files":
            out["files"] += [f.path for f in rec.files.files]
    return out
