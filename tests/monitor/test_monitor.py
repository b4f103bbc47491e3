"""Monitor: the local log holds exactly what was given, only rank 0 writes, W&B failures never stop it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from adapt_pretrain.monitor import Monitor, WandbConfig, read_metrics
from adapt_pretrain.monitor.monitor import to_histogram

OFF = WandbConfig(enabled=False)


def test_local_log_roundtrip(tmp_path, capsys):
    mon = Monitor(str(tmp_path), {"model": {"layers": 2}}, OFF, rank=0)
    mon.log_step(0, {"loss": torch.tensor(2.5), "adapt/weight_mean": np.float32(0.5)},
                 histograms={"hist/weights": ([1, 2, 3], [0.0, 0.5, 0.75, 1.0]), "raw": torch.rand(100)},
                 tables={"extremes": [{"domain": "web", "id": 3, "snippet": "x", "weight": 0.9}]})
    mon.log_event(0, "anchor_refresh", centroid_shift=0.25)
    mon.log_step(1, {"loss": 2.0})
    mon.close()
    mon.close()  # idempotent
    mon.log_step(2, {"loss": 1.0})  # after close: ignored, no crash
    steps, events = read_metrics(str(tmp_path))
    assert list(steps) == [0, 1]
    assert steps[0]["scalars"] == {"loss": 2.5, "adapt/weight_mean": 0.5}
    assert steps[0]["histograms"]["hist/weights"] == {"counts": [1.0, 2.0, 3.0], "bins": [0.0, 0.5, 0.75, 1.0]}
    assert sum(steps[0]["histograms"]["raw"]["counts"]) == 100
    assert steps[0]["tables"]["extremes"][0]["weight"] == 0.9
    assert "histograms" not in steps[1] and "tables" not in steps[1]
    assert events == [dict(events[0], step=0, event="anchor_refresh", fields={"centroid_shift": 0.25})]
    meta = json.loads((tmp_path / "monitor.json").read_text())
    assert meta["config"] == {"model": {"layers": 2}} and meta["wandb"]["mode"] == "disabled"
    out = capsys.readouterr().out
    assert "[step 0] loss=2.5000 w_mean=0.500" in out and "event anchor_refresh" in out


def test_only_rank_zero_writes(tmp_path):
    mon = Monitor(str(tmp_path / "r1"), {"a": 1}, WandbConfig(mode="offline"), rank=1)
    mon.log_step(0, {"loss": 1.0})
    mon.log_event(0, "x", a=1)
    mon.close()
    assert not (tmp_path / "r1").exists()
    assert not mon.histogram_due(0) and not mon.table_due(0)


def test_cadence_and_mode_resolution(tmp_path, monkeypatch):
    mon = Monitor(str(tmp_path), {}, WandbConfig(enabled=False, histogram_interval=5, table_interval=0))
    assert [s for s in range(12) if mon.histogram_due(s)] == [0, 5, 10]
    assert not any(mon.table_due(s) for s in range(12))
    mon.close()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert WandbConfig().resolved_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert WandbConfig().resolved_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert WandbConfig().resolved_mode() == "disabled"
    assert WandbConfig(mode="offline").resolved_mode() == "offline"
    assert WandbConfig(enabled=False, mode="online").resolved_mode() == "disabled"


def test_to_histogram_validates():
    with pytest.raises(ValueError):
        to_histogram(([1, 2], [0.0, 1.0]))
    h = to_histogram(np.array([0.0, np.nan, 1.0, np.inf]), num_bins=2)
    assert h["counts"] == [1.0, 1.0]


def _log_three(run_dir: str, wandb: WandbConfig) -> Monitor:
    mon = Monitor(run_dir, {"a": 1}, wandb, rank=0, stdout=False)
    for step in range(3):
        mon.log_step(step, {"loss": 1.0 / (step + 1)}, histograms={"hist/weights": ([1, 1], [0.0, 0.5, 1.0])})
    mon.log_event(2, "anchor_refresh", centroid_shift=0.1)
    mon.close()
    return mon


def _assert_local_complete(run_dir: str, disabled_stage: str) -> None:
    steps, events = read_metrics(run_dir)
    assert [steps[s]["scalars"]["loss"] for s in range(3)] == [1.0, 0.5, 1.0 / 3]
    assert [e["fields"]["stage"] for e in events if e["event"] == "wandb_disabled"] == [disabled_stage]
    assert any(e["event"] == "anchor_refresh" for e in events)


def test_wandb_init_failure_keeps_local_log(tmp_path, monkeypatch):
    import wandb

    def boom(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", boom)
    with pytest.warns(RuntimeWarning, match="W&B init failed"):
        mon = _log_three(str(tmp_path), WandbConfig(mode="online"))
    assert mon.wandb_run is None
    _assert_local_complete(str(tmp_path), "init")


class _BrokenRun:
    id = "broken"
    settings = None

    def __init__(self) -> None:
        self.calls = 0

    def log(self, *args, **kwargs):
        self.calls += 1
        raise OSError("disk full")

    def finish(self, *args, **kwargs):
        raise AssertionError("finish must not be called on a run that failed")


def test_wandb_log_failure_warns_once_and_keeps_local_log(tmp_path, monkeypatch):
    import wandb

    run = _BrokenRun()
    monkeypatch.setattr(wandb, "init", lambda *a, **k: run)
    with pytest.warns(RuntimeWarning) as record:
        _log_three(str(tmp_path), WandbConfig(mode="offline"))
    assert len([w for w in record if "W&B" in str(w.message)]) == 1
    assert run.calls == 1  # mirror turned off after the first failure
    _assert_local_complete(str(tmp_path), "log")


def test_wandb_unimportable_in_subprocess(tmp_path):
    code = textwrap.dedent(f"""
        import sys, warnings
        sys.modules["wandb"] = None  # any `import wandb` now raises ImportError
        from adapt_pretrain.monitor import Monitor, WandbConfig
        mon = Monitor({str(tmp_path)!r}, {{"a": 1}}, WandbConfig(mode="offline"), rank=0, stdout=False)
        for step in range(3):
            mon.log_step(step, {{"loss": 1.0 / (step + 1)}}, histograms={{"hist/weights": ([1, 1], [0.0, 0.5, 1.0])}})
        mon.log_event(2, "anchor_refresh", centroid_shift=0.1)
        mon.close()
        assert "torch" not in sys.modules  # the logger alone does not pull in torch
        print("TRAINING-CONTINUED")
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "TRAINING-CONTINUED" in proc.stdout
    assert "W&B import failed" in proc.stderr
    _assert_local_complete(str(tmp_path), "import")


class _HungRun:
    id = "hung"
    settings = None

    def __init__(self) -> None:
        import threading

        self.release = threading.Event()

    def log(self, *args, **kwargs):
        self.release.wait(10)  # a stalled network

    def finish(self, *args, **kwargs):
        raise AssertionError("finish must not be called on a hung run")


def test_close_does_not_hang_on_a_stalled_wandb(tmp_path, monkeypatch):
    import time

    import wandb

    run = _HungRun()
    monkeypatch.setattr(wandb, "init", lambda *a, **k: run)
    mon = Monitor(str(tmp_path), {}, WandbConfig(mode="offline"), rank=0, stdout=False)
    t0 = time.perf_counter()
    for step in range(3):
        mon.log_step(step, {"loss": 1.0})  # returns at once: W&B calls are on the worker thread
    assert time.perf_counter() - t0 < 1.0
    with pytest.warns(RuntimeWarning, match="drain"):
        mon.close(timeout=0.5)
    run.release.set()
    assert time.perf_counter() - t0 < 5.0
    steps, events = read_metrics(str(tmp_path))
    assert sorted(steps) == [0, 1, 2] and events[-1]["fields"]["stage"] == "drain"
