"""Read back what W&B wrote offline: `wandb/offline-run-*/run-<id>.wandb`.

The file is LevelDB's log format: a 7-byte header (`:W&B`, 0xBEE1, version), then 32 KiB blocks of
records, each with a 7-byte header (crc32, little-endian length, type 1 full / 2 first / 3 middle /
4 last) whose joined payloads are `wandb_internal_pb2.Record` protobufs. wandb ships no reader for it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, f"not a W&B file: {path}"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # the rest of a block too small for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        if kind in (1, 2):
            pending = payload
        else:
            pending += payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def run_dirs(wandb_root: Path) -> list[Path]:
    return sorted(Path(wandb_root).glob("offline-run-*"))


def run_id(run_dir: Path) -> str:
    return run_dir.name.rsplit("-", 1)[1]


def records(run_dir: Path):
    """Every record of the run's .wandb file, in order (run, config, history, artifact, ...)."""
    (wandb_file,) = Path(run_dir).glob("run-*.wandb")
    return list(read_records(wandb_file))


def history(run_dir: Path) -> list[dict]:
    """One dict per history row: {key: value}, `_step` included."""
    (wandb_file,) = Path(run_dir).glob("run-*.wandb")
    rows = []
    for record in read_records(wandb_file):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def config(run_dir: Path) -> dict:
    (wandb_file,) = Path(run_dir).glob("run-*.wandb")
    values = {}
    for record in read_records(wandb_file):
        if record.WhichOneof("record_type") in ("config", "run"):
            cfg = record.config if record.WhichOneof("record_type") == "config" else record.run.config
            for item in cfg.update:
                key = item.key or "/".join(item.nested_key)
                values[key] = json.loads(item.value_json)
    return values
