"""The `.wandb` reader: format edge cases on hand-built files, then a real wandb offline round trip
whose history must equal the local metrics.jsonl."""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import zlib

import pytest
from wandb.proto import wandb_internal_pb2 as pb

from adapt_pretrain.monitor import WandbConfig, read_metrics
from adapt_pretrain.monitor.wandb_reader import (
    BLOCK_SIZE, FIRST, FULL, LAST, MIDDLE, WandbFileError, find_run_file, iter_chunks, read_complete_run, read_run,
)
from adapt_pretrain.monitor.verify import verify_wandb_mirror
from tests.monitor.synthetic import write_synthetic_run


def _write_log(path, payloads: list[bytes]) -> None:
    """An independent LevelDB-style writer (the scheme wandb-core uses) for hand-built files."""
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for payload in payloads:
        rest, first = payload, True
        while True:
            room = BLOCK_SIZE - len(out) % BLOCK_SIZE
            if room < 7:
                out += b"\0" * room
                room = BLOCK_SIZE
            take = min(len(rest), room - 7)
            last = take == len(rest)
            kind = FULL if first and last else FIRST if first else LAST if last else MIDDLE
            chunk = rest[:take]
            crc = zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
            out += struct.pack("<IHB", crc, len(chunk), kind) + chunk
            rest, first = rest[take:], False
            if last:
                break
    path.write_bytes(bytes(out))


def _history(step: int, **values) -> bytes:
    rec = pb.Record()
    rec.history.step.num = step
    item = rec.history.item.add()
    item.nested_key.append("_step")
    item.value_json = json.dumps(step)
    for key, value in values.items():
        item = rec.history.item.add()
        item.nested_key.extend(key.split("."))
        item.value_json = json.dumps(value)
    return rec.SerializeToString()


def test_fragmented_records_and_padding(tmp_path):
    big = "x" * (BLOCK_SIZE * 2 + 123)  # spans three blocks: FIRST, MIDDLE, LAST
    payloads = [_history(0, loss=1.5), _history(1, text=big, **{"h._type": "histogram", "h.values": [1, 2]})]
    payloads += [_history(s, loss=1.0 / s) for s in range(2, 400)]  # many small records cross block ends
    path = tmp_path / "run.wandb"
    _write_log(path, payloads)
    kinds = {k for (_, k, _, _) in iter_chunks(path.read_bytes())}
    assert kinds == {FULL, FIRST, MIDDLE, LAST}
    run = read_run(str(path))
    assert not run.complete  # no exit record written
    hist = run.history
    assert len(hist) == 400 and hist[0]["loss"] == 1.5 and hist[1]["text"] == big
    assert hist[1]["h"] == {"_type": "histogram", "values": [1, 2]}
    assert all(hist[s]["loss"] == 1.0 / s for s in range(2, 400))


def test_truncated_tail_and_corruption(tmp_path):
    path = tmp_path / "run.wandb"
    _write_log(path, [_history(s, loss=float(s)) for s in range(5)])
    data = path.read_bytes()
    (tmp_path / "cut.wandb").write_bytes(data[:-3])  # killed mid-write
    assert sorted(read_run(str(tmp_path / "cut.wandb")).history) == [0, 1, 2, 3]
    with pytest.raises(TimeoutError):  # never closed by an exit record
        read_complete_run(str(tmp_path / "cut.wandb"), timeout=0.2)
    exit_rec = pb.Record()
    exit_rec.exit.exit_code = 0
    _write_log(tmp_path / "done.wandb", [_history(0, loss=1.0), exit_rec.SerializeToString()])
    assert read_complete_run(str(tmp_path / "done.wandb"), timeout=1).history[0]["loss"] == 1.0
    bad = bytearray(data)
    bad[20] ^= 0xFF  # inside the first record's payload
    (tmp_path / "bad.wandb").write_bytes(bytes(bad))
    with pytest.raises(WandbFileError, match="CRC"):
        read_run(str(tmp_path / "bad.wandb"))
    assert sorted(read_run(str(tmp_path / "bad.wandb"), strict=False).history) == [1, 2, 3, 4]
    (tmp_path / "not.wandb").write_bytes(b"hello world")
    with pytest.raises(WandbFileError, match="not a W&B log"):
        read_run(str(tmp_path / "not.wandb"))


def _close(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def test_real_wandb_offline_roundtrip_equals_metrics_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = str(tmp_path / "run")
    write_synthetic_run(run_dir, steps=60, wandb=WandbConfig(mode="offline", histogram_interval=5, table_interval=20))
    path = find_run_file(run_dir)
    run = read_complete_run(path)  # wandb-core flushes the tail after finish() returns
    steps, events = read_metrics(run_dir)
    assert os.path.getsize(path) > BLOCK_SIZE  # the real file spans several blocks
    assert sorted(run.history) == sorted(steps) == list(range(60))
    n_scalars = n_hists = n_tables = 0
    for step, line in steps.items():
        row = run.history[step]
        for key, value in line["scalars"].items():
            assert _close(row[key], value), (step, key, row.get(key), value)
            n_scalars += 1
        for key, h in line.get("histograms", {}).items():
            assert row[key]["_type"] == "histogram"
            assert _close(row[key]["values"], h["counts"]) and _close(row[key]["bins"], h["bins"]), (step, key)
            n_hists += 1
        for key, rows in line.get("tables", {}).items():
            meta = row[key]
            assert meta["_type"] == "table-file" and meta["nrows"] == len(rows)
            with open(os.path.join(os.path.dirname(path), "files", meta["path"])) as fh:
                table = json.load(fh)
            got = [dict(zip(table["columns"], r)) for r in table["data"]]
            assert all(g.keys() == w.keys() and all(_close(g[k], w[k]) for k in w) for g, w in zip(got, rows))
            n_tables += 1
        assert ("hist/weights" in row) == ("histograms" in line)  # W&B got nothing the local log lacks
    for ev in events:
        if ev["event"] == "anchor_refresh":
            for field, value in ev["fields"].items():
                assert _close(run.history[ev["step"]][f"event/anchor_refresh/{field}"], value)
    assert n_scalars > 60 * 30 and n_hists == 2 * 12 and n_tables == 3
    assert run.config["adapt"] == {"enabled": True, "tau": 0.25} and run.config["seed"] == 0
    assert "curriculum/mean_weight_table" in run.history[59]  # the multi-line curriculum chart
    # the packaged checker agrees, and notices a difference
    check = verify_wandb_mirror(run_dir)
    assert check.ok and check.steps == 60 and check.values == n_scalars + n_hists + n_tables + 6, check.mismatches
    # a killed run: no exit record; compare what W&B's file holds
    killed = str(tmp_path / "killed")
    shutil.copytree(run_dir, killed, symlinks=True)
    wb_file = find_run_file(killed)
    with open(wb_file, "r+b") as fh:
        fh.truncate(os.path.getsize(wb_file) - 3000)
    part = verify_wandb_mirror(killed, allow_incomplete=True)
    assert part.ok and not part.complete and 0 < part.steps < 60, part
    metrics = os.path.join(run_dir, "metrics.jsonl")
    lines = [json.loads(x) for x in open(metrics)]
    for line in lines:
        if line.get("step") == 7 and "scalars" in line:
            line["scalars"]["loss/mean"] = -1.0
    with open(metrics, "w") as fh:
        fh.write("".join(json.dumps(x) + "\n" for x in lines if x.get("step") != 8))
    bad = verify_wandb_mirror(run_dir)
    assert not bad.ok and any("step 7 loss/mean" in m for m in bad.mismatches)
    assert any("step 8: in W&B but not in metrics.jsonl" in m for m in bad.mismatches)
