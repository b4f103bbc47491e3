"""Reader of W&B's offline `.wandb` transaction log, so tests can see what W&B actually received.

wandb 0.31 ships no Python reader for this file. Format (observed in wandb-core's
writes, same scheme as LevelDB's log):
- file header, 7 bytes: b":W&B", magic 0xBEE1 (little endian), version 0;
- the file is cut into 32 KiB blocks counted from the start of the file (header included);
- each chunk has a 7-byte header: CRC-32 (zlib, little endian) of type byte + payload, payload
  length (uint16 LE), type (1 FULL, 2 FIRST, 3 MIDDLE, 4 LAST); a record larger than the room
  left in a block is split into FIRST/MIDDLE.../LAST chunks; fewer than 7 bytes left in a block
  are zero padding;
- each reassembled payload is a serialised `wandb.proto.wandb_internal_pb2.Record`.
History rows are `Record.history` with items (`key` or `nested_key` path, `value_json`).
"""
from __future__ import annotations

import glob
import json
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

BLOCK_SIZE = 32 * 1024
HEADER_SIZE = 7
FILE_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a W&B transaction log or a chunk is corrupt."""


def _crc(kind: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF


def iter_chunks(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """Yield (offset, type, stored crc, payload) for every chunk after the file header; stops at a
    truncated tail (a run killed mid-write)."""
    pos = HEADER_SIZE
    while pos < len(data):
        room = BLOCK_SIZE - pos % BLOCK_SIZE
        if room < HEADER_SIZE:  # block trailer padding
            pos += room
            continue
        if pos + HEADER_SIZE > len(data):
            return
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0:  # zero fill: skip to the next block
            pos += room
            continue
        start = pos + HEADER_SIZE
        if start + length > len(data):
            return
        yield pos, kind, crc, data[start:start + length]
        pos = start + length


def iter_payloads(path: str, strict: bool = True) -> Iterator[bytes]:
    """Yield each record's reassembled payload. A CRC mismatch or a broken FIRST/MIDDLE/LAST
    sequence raises with `strict`; otherwise the broken record is skipped."""
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:HEADER_SIZE] != FILE_HEADER:
        raise WandbFileError(f"{path}: not a W&B log (header {data[:HEADER_SIZE]!r})")
    pending: bytearray | None = None
    for offset, kind, crc, payload in iter_chunks(data):
        if _crc(kind, payload) != crc:
            if strict:
                raise WandbFileError(f"{path}: CRC mismatch in chunk at offset {offset}")
            pending = None
            continue
        if kind == FULL and pending is None:
            yield payload
        elif kind == FIRST and pending is None:
            pending = bytearray(payload)
        elif kind == MIDDLE and pending is not None:
            pending += payload
        elif kind == LAST and pending is not None:
            yield bytes(pending + payload)
            pending = None
        elif strict:
            raise WandbFileError(f"{path}: unexpected chunk type {kind} at offset {offset}")
        else:
            pending = bytearray(payload) if kind == FIRST else None
            if kind == FULL:
                yield payload


def iter_records(path: str, strict: bool = True) -> Iterator[Any]:
    """Yield parsed `wandb_internal_pb2.Record` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in iter_payloads(path, strict):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _set_path(row: dict[str, Any], path: list[str], value: Any) -> None:
    node = row
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


@dataclass
class WandbRun:
    """What the log holds: history rows by step (nested keys rebuilt as dicts) and the run config."""

    history: dict[int, dict[str, Any]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    complete: bool = False  # the final `exit` record is present


def read_run(path: str, strict: bool = True) -> WandbRun:
    """Parse a `.wandb` file. Rows logged more than once for a step are merged (later values win)."""
    run = WandbRun()
    for record in iter_records(path, strict):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                key_path = list(item.nested_key) or [item.key]
                _set_path(row, key_path, json.loads(item.value_json))
            step = row.get("_step", record.history.step.num)
            run.history.setdefault(int(step), {}).update(row)
        elif kind == "exit":
            run.complete = True
        elif kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            for item in updates:
                key_path = list(item.nested_key) or [item.key]
                _set_path(run.config, key_path, json.loads(item.value_json))
    return run


def read_complete_run(path: str, timeout: float = 30.0, poll: float = 0.1) -> WandbRun:
    """Read a run once W&B has finished writing it. `wandb.finish()` returns before wandb-core has
    flushed its last (partial) block, so a file read right after finish can miss the last rows;
    this waits for the `exit` record that closes the log."""
    deadline = time.monotonic() + timeout
    while True:
        run = read_run(path, strict=True)
        if run.complete:
            return run
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout:.0f} s (run still open or killed)")
        time.sleep(poll)



def find_run_file(wandb_dir: str) -> str:
    """The newest `run-*.wandb` under a directory (a run dir, its `wandb/` folder or a parent)."""
    found = glob.glob(os.path.join(wandb_dir, "**", "*.wandb"), recursive=True)
    if not found:
        raise FileNotFoundError(f"no .wandb file under {wandb_dir}")
    return max(found, key=os.path.getmtime)
