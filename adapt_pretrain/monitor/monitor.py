"""Monitor: the one object the trainer logs through; a local `metrics.jsonl` plus an optional W&B mirror.

Why both: W&B is where users look, but it may be offline, missing or broken on a cluster; the
local JSON-lines file is the ground truth that `adapt-pretrain report` plots and that tests compare
W&B against. Only rank 0 does any I/O; other ranks get a no-op object so the trainer can call it
unconditionally. A W&B failure (import, init, log, finish) warns once, turns the mirror off and
never stops training; an online start that fails (no network, server down) falls back to an offline
run that `wandb sync` uploads later. One run directory is one W&B run: its id is kept in the run
directory, so a resumed training run continues the same W&B run.

metrics.jsonl lines (append mode, so a resumed run continues the file; readers keep the last line
per step):
- step:  {"step": s, "time": unix, "scalars": {...}, "histograms": {name: {"counts": [...], "bins": [...]}},
          "tables": {name: [row, ...]}}  (histograms/tables only when given)
- event: {"step": s, "time": unix, "event": name, "fields": {...}}
W&B receives exactly the same values at the same step: scalars under their names, histograms as
`wandb.Histogram(np_histogram=(counts, bins))`, tables as `wandb.Table`, events as
`event/<name>/<field>`. In addition W&B gets a derived curriculum chart (`curriculum/mean_weight`,
one line per domain) on table steps and at close.
"""
from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict
from typing import Any, Mapping, Sequence

import numpy as np

from adapt_pretrain.monitor.config import WandbConfig
from adapt_pretrain.monitor.console import console_line
from adapt_pretrain.monitor.wandb_mirror import WandbMirror

METRICS_FILE = "metrics.jsonl"
META_FILE = "monitor.json"

Histogram = tuple[Sequence[float], Sequence[float]]


def to_histogram(value: Any, num_bins: int = 32) -> dict[str, list[float]]:
    """Normalise a histogram argument to {"counts", "bins"}: accepts (counts, edges) or raw values
    (torch tensor, ndarray, list), which are binned with numpy over their own [min, max]."""
    if isinstance(value, tuple) and len(value) == 2:
        counts, edges = (np.asarray(_to_numpy(x), dtype=np.float64) for x in value)
        if edges.size != counts.size + 1:
            raise ValueError(f"histogram edges need len(counts)+1 entries, got {edges.size} for {counts.size}")
    else:
        values = np.asarray(_to_numpy(value), dtype=np.float64).reshape(-1)
        values = values[np.isfinite(values)]
        counts, edges = np.histogram(values, bins=num_bins)
    return {"counts": [float(c) for c in counts], "bins": [float(e) for e in edges]}


def _to_numpy(x: Any) -> Any:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        return x.detach().float().cpu().numpy()
    return x


def _scalar(v: Any) -> float:
    if hasattr(v, "item"):
        v = v.item()
    return float(v)


def _jsonable(obj: Any) -> Any:
    """Config -> plain JSON types (dataclasses and unknown objects via str) so W&B and the file agree."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    return json.loads(json.dumps(obj, default=str))


class Monitor:
    """Logs one training run. Construct on every rank; only `rank == 0` writes anything.

    run_dir: the run directory (created); config: the run's configuration (logged once);
    wandb: mirror settings (None: defaults); stdout: print `console_line` (console.py) per `log_step`.
    """

    def __init__(self, run_dir: str, config: Mapping[str, Any] | None = None,
                 wandb: WandbConfig | None = None, rank: int = 0, stdout: bool = True) -> None:
        self.run_dir = run_dir
        self.rank = rank
        self.wandb_config = wandb or WandbConfig()
        self.stdout = stdout
        self.active = rank == 0
        self._file = None
        self._mirror: WandbMirror | None = None
        self._closed = False
        self._lock = threading.Lock()  # the W&B worker thread may write a `wandb_disabled` event
        if not self.active:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._file = open(os.path.join(run_dir, METRICS_FILE), "a", encoding="utf-8")
        self.config = _jsonable(dict(config or {}))
        self._mirror = WandbMirror(self.wandb_config, run_dir, self.config, self._write)
        self._write_meta()

    # ----- cadence helpers: let the trainer skip building what will not be logged
    def histogram_due(self, step: int) -> bool:
        n = self.wandb_config.histogram_interval
        return self.active and n > 0 and step % n == 0

    def table_due(self, step: int) -> bool:
        n = self.wandb_config.table_interval
        return self.active and n > 0 and step % n == 0

    @property
    def wandb_run(self) -> Any:
        """The live wandb run, or None when the mirror is off or has failed."""
        return self._mirror.run if self._mirror is not None else None

    # ----- logging
    def log_step(self, step: int, scalars: Mapping[str, Any],
                 histograms: Mapping[str, Any] | None = None,
                 tables: Mapping[str, list[dict[str, Any]]] | None = None) -> None:
        """Log one step's metrics. Scalars: name -> number; histograms: name -> (counts, edges) or raw
        values; tables: name -> list of row dicts (same keys in every row)."""
        if not self.active or self._closed:
            return
        step = int(step)
        clean = {k: _scalar(v) for k, v in scalars.items()}
        hists = {k: to_histogram(v) for k, v in (histograms or {}).items()}
        line: dict[str, Any] = {"step": step, "time": time.time(), "scalars": clean}
        if hists:
            line["histograms"] = hists
        if tables:
            line["tables"] = {k: _jsonable(list(rows)) for k, rows in tables.items()}
        self._write(line)
        if self._mirror is not None:  # copies: the trainer may reuse its dicts
            self._mirror.log_step(step, clean, hists, line.get("tables"), self.table_due(step))
        if self.stdout:
            print(console_line(step, clean), flush=True)

    def log_event(self, step: int, name: str, **fields: Any) -> None:
        """Log a discrete event (e.g. anchor refresh with its centroid shift) at a step."""
        if not self.active or self._closed:
            return
        clean = _jsonable(fields)
        self._write({"step": int(step), "time": time.time(), "event": name, "fields": clean})
        if self._mirror is not None:
            self._mirror.log_event(step, name, clean)
        if self.stdout:
            print(f"[step {step}] event {name} " + " ".join(f"{k}={v}" for k, v in clean.items()), flush=True)

    def close(self, timeout: float = 300.0) -> None:
        """Flush the local log and finish the W&B run (idempotent). If the W&B worker has not drained
        within `timeout` seconds (a hung network), give up on W&B rather than hang the job's exit."""
        if not self.active or self._closed:
            return
        self._closed = True
        if self._mirror is not None:
            self._mirror.finish(timeout)
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----- internals
    def _write(self, line: dict[str, Any]) -> None:
        text = json.dumps(line, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is not None:
                self._file.write(text)
                self._file.flush()

    def _write_meta(self) -> None:
        meta = {"config": self.config, "wandb": self._mirror.describe()}
        with open(os.path.join(self.run_dir, META_FILE), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)


class NullMonitor(Monitor):
    """A monitor that logs nothing (for code paths that want a monitor object unconditionally)."""

    def __init__(self) -> None:  # noqa: D107 - deliberately skips all I/O
        self.active = False
        self._closed = True
        self.wandb_config = WandbConfig(enabled=False)
        self._mirror = None


def read_metrics(run_dir: str) -> tuple[dict[int, dict[str, Any]], list[dict[str, Any]]]:
    """Load metrics.jsonl: (step -> last step line, events in file order). Tolerates a torn last line."""
    steps: dict[int, dict[str, Any]] = {}
    events: list[dict[str, Any]] = []
    path = run_dir if run_dir.endswith(".jsonl") else os.path.join(run_dir, METRICS_FILE)
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            raw = raw.strip()
            if not raw:
                continue
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a run killed mid-write leaves a partial last line
            if "event" in line:
                events.append(line)
            elif "step" in line:
                steps[int(line["step"])] = line
    return dict(sorted(steps.items())), events
