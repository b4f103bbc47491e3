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
import math
import os
import queue
import secrets
import string
import threading
import time
import warnings
from dataclasses import asdict
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from adapt_pretrain.logs import get_logger
from adapt_pretrain.monitor.config import WandbConfig
from adapt_pretrain.monitor.console import console_line

METRICS_FILE = "metrics.jsonl"
META_FILE = "monitor.json"
_CURRICULUM_KEY = "curriculum/mean_weight"
_CURRICULUM_MAX_POINTS = 200
log = get_logger(__name__)


RUN_ID_FILE = "wandb_run_id"  # in the run directory: one training run (with its resumes) is one W&B run


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
        self._run: Any = None
        self._wandb: Any = None
        self._mode = "disabled"  # the W&B mode actually running (offline after a failed online start)
        self._warned = False
        self._closed = False
        self._curriculum: dict[str, list[tuple[int, float]]] = {}
        self._last_curriculum_step: int | None = None
        self._last_step: int | None = None
        self._lock = threading.Lock()
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        if not self.active:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._file = open(os.path.join(run_dir, METRICS_FILE), "a", encoding="utf-8")
        self.config = _jsonable(dict(config or {}))
        self._init_wandb()
        self._write_meta()
        if self._run is not None and self.wandb_config.background:
            self._queue = queue.Queue(maxsize=1000)  # bounded: a stalled W&B slows training, never OOMs it
            self._thread = threading.Thread(target=self._worker, name="adapt-monitor-wandb", daemon=True)
            self._thread.start()

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
        return self._run

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
        for key, value in clean.items():
            if key.startswith("domain/") and key.endswith("/mean_weight"):
                self._curriculum.setdefault(key[len("domain/"):-len("/mean_weight")], []).append((step, value))
        self._last_step = step
        if self._run is not None:
            self._wandb_log(step, clean, hists, line.get("tables"))  # copies: the trainer may reuse its dicts
            if self.table_due(step):
                self._log_curriculum(step)
        if self.stdout:
            print(console_line(step, clean), flush=True)

    def log_event(self, step: int, name: str, **fields: Any) -> None:
        """Log a discrete event (e.g. anchor refresh with its centroid shift) at a step."""
        if not self.active or self._closed:
            return
        clean = _jsonable(fields)
        self._write({"step": int(step), "time": time.time(), "event": name, "fields": clean})
        if self._run is not None:
            data = {f"event/{name}/{k}": v for k, v in clean.items() if isinstance(v, (int, float, bool))}
            data = data or {f"event/{name}/count": 1}
            self._submit(lambda run: run.log(data, step=int(step)))
        if self.stdout:
            print(f"[step {step}] event {name} " + " ".join(f"{k}={v}" for k, v in clean.items()), flush=True)

    def close(self, timeout: float = 300.0) -> None:
        """Flush the local log and finish the W&B run (idempotent). If the W&B worker has not drained
        within `timeout` seconds (a hung network), give up on W&B rather than hang the job's exit."""
        if not self.active or self._closed:
            return
        if self._run is not None and self._last_step is not None and self._last_curriculum_step != self._last_step:
            self._log_curriculum(self._last_step)
        self._closed = True
        if self._thread is not None:
            assert self._queue is not None
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._warn("drain", TimeoutError(f"W&B worker still busy after {timeout:.0f} s"))
                self._run = None
            self._thread = None
        if self._run is not None:
            run = self._run
            self._guard(run.finish, "finish")
            self._run = None
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
        with self._lock:  # the W&B worker thread may write a `wandb_disabled` event
            if self._file is not None:
                self._file.write(text)
                self._file.flush()

    def _write_meta(self) -> None:
        run = self._run
        meta = {
            "config": self.config,
            "wandb": {
                "mode": self._mode if run is not None else "disabled",
                "project": self.wandb_config.project,
                "run_id": getattr(run, "id", None),
                "run_dir": getattr(getattr(run, "settings", None), "sync_dir", None) if run is not None else None,
            },
        }
        if meta["wandb"]["mode"] == "offline" and meta["wandb"]["run_dir"]:
            meta["wandb"]["sync_command"] = self._sync_command()
        with open(os.path.join(self.run_dir, META_FILE), "w", encoding="utf-8") as fh:
            json.dump(meta, fh, indent=1)

    def _warn(self, what: str, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            msg = f"adapt-pretrain monitor: W&B {what} failed ({type(exc).__name__}: {exc}); " \
                  f"W&B mirror turned off, local {METRICS_FILE} continues"
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
            log.warning(msg)
            if self._file is not None:
                self._write({"step": self._last_step, "time": time.time(), "event": "wandb_disabled",
                             "fields": {"stage": what, "error": f"{type(exc).__name__}: {exc}"}})

    def _submit(self, fn: Callable[[Any], None]) -> None:
        """Run `fn(run)` for W&B: on the worker thread when background, else now; failures disable W&B."""
        if self._run is None:
            return
        if self._queue is not None:
            self._queue.put(fn)
        else:
            run = self._run
            self._guard(lambda: fn(run), "log")

    def _worker(self) -> None:
        assert self._queue is not None
        while True:
            fn = self._queue.get()
            if fn is None:
                return
            run = self._run
            if run is not None:
                self._guard(lambda: fn(run), "log")

    def _guard(self, fn: Any, what: str) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - W&B must never stop training
            self._run = None  # wandb's own atexit hook finishes a half-broken run; do not block here
            self._warn(what, exc)
            return None

    def _init_wandb(self) -> None:
        cfg = self.wandb_config
        mode = cfg.resolved_mode()
        if mode == "disabled":
            return
        try:
            import wandb
        except Exception as exc:  # noqa: BLE001 - ImportError or a broken install
            self._warn("import", exc)
            return
        self._wandb = wandb
        run_id, resuming = self._run_id()
        t0 = time.monotonic()
        try:
            self._run = self._start_run(mode, run_id, resuming)
            self._mode = mode
            return
        except Exception as exc:  # noqa: BLE001 - W&B must never stop training
            if mode != "online" or not cfg.offline_fallback:
                self._warn("init", exc)
                return
            failure, waited = exc, time.monotonic() - t0
        try:
            wandb.teardown()  # the failed online attempt still holds the run id inside W&B's service
        except Exception:  # noqa: BLE001
            pass
        try:
            self._run = self._start_run("offline", run_id, resuming)
        except Exception as exc:  # noqa: BLE001
            self._warn("init", exc)
            return
        self._mode = "offline"
        msg = (f"adapt-pretrain monitor: W&B online start failed after {waited:.0f} s "
               f"({type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}); "
               f"logging to an OFFLINE W&B run instead. Upload it later with: {self._sync_command()}")
        log.warning(msg)
        self._write({"step": None, "time": time.time(), "event": "wandb_offline_fallback",
                     "fields": {"error": f"{type(failure).__name__}: {failure}", "waited_s": round(waited, 1),
                                "sync_command": self._sync_command()}})

    def _run_id(self) -> tuple[str, bool]:
        """(W&B run id, whether it continues an earlier start of this run directory).

        The id is chosen here and kept in RUN_DIR/wandb_run_id, so every resume of the training run
        logs into the same W&B run (resume="allow"), and an offline fallback run can be synced into it.
        """
        path = os.path.join(self.run_dir, RUN_ID_FILE)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                run_id = fh.read().strip()
            if run_id:
                return run_id, True
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(run_id + "\n")
        return run_id, False

    def _start_run(self, mode: str, run_id: str, resuming: bool) -> Any:
        cfg, wandb = self.wandb_config, self._wandb
        return wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.name, group=cfg.group,
            tags=list(cfg.tags) or None, mode=mode, dir=cfg.dir or self.run_dir,
            config=self.config, reinit="finish_previous", id=run_id,
            resume="allow" if resuming else None, allow_val_change=resuming or None,
            settings=wandb.Settings(init_timeout=cfg.init_timeout),
        )

    def _sync_command(self) -> str:
        """`wandb sync` for every offline start of this run, in start order, into one W&B run."""
        run = self._run
        run_id = getattr(run, "id", None) or "ID"
        sync_dir = getattr(getattr(run, "settings", None), "sync_dir", None)
        wandb_dir = os.path.dirname(sync_dir) if sync_dir else os.path.join(self.wandb_config.dir or self.run_dir,
                                                                              "wandb")
        return f"wandb sync --id {run_id} {wandb_dir}/offline-run-*-{run_id}"

    def _wandb_log(self, step: int, scalars: dict[str, float], hists: dict[str, dict[str, list[float]]],
                   tables: dict[str, list[dict[str, Any]]] | None) -> None:
        wandb = self._wandb

        def build_and_log(run: Any) -> None:
            data: dict[str, Any] = dict(scalars)
            for key, h in hists.items():
                data[key] = wandb.Histogram(np_histogram=(h["counts"], h["bins"]))
            for key, rows in (tables or {}).items():
                columns = list(rows[0].keys()) if rows else ["empty"]
                data[key] = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])
            run.log(data, step=step)

        self._submit(build_and_log)

    def _log_curriculum(self, step: int) -> None:
        """One W&B chart with a line per domain (W&B has no built-in multi-key line chart)."""
        if not self._curriculum or self._run is None:
            return
        wandb = self._wandb
        domains = sorted(self._curriculum)
        xs, ys = [], []
        for d in domains:
            pts = self._curriculum[d]
            stride = max(1, math.ceil(len(pts) / _CURRICULUM_MAX_POINTS))
            pts = pts[::stride] + ([pts[-1]] if (len(pts) - 1) % stride else [])
            xs.append([p[0] for p in pts])
            ys.append([p[1] for p in pts])

        def log(run: Any) -> None:
            chart = wandb.plot.line_series(xs=xs, ys=ys, keys=domains, title="Per-domain mean weight", xname="step")
            run.log({_CURRICULUM_KEY: chart}, step=step)

        self._submit(log)
        self._last_curriculum_step = step


class NullMonitor(Monitor):
    """A monitor that logs nothing (for code paths that want a monitor object unconditionally)."""

    def __init__(self) -> None:  # noqa: D107 - deliberately skips all I/O
        self.active = False
        self._closed = True
        self.wandb_config = WandbConfig(enabled=False)
        self._run = None


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
