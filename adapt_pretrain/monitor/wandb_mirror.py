"""`WandbMirror`: the W&B side of the `Monitor`: start (with an offline fallback), log, finish.

Why apart from the Monitor: the local metrics.jsonl is the ground truth and must work with no W&B at
all; everything W&B needs (its run id kept in the run directory, the background worker, the
fallback to an offline run, the curriculum chart, warning once and switching off on a failure)
lives here. A failure never reaches training: it is warned once, recorded as a `wandb_disabled`
event through `record_event`, and the mirror turns off.
"""
from __future__ import annotations

import math
import os
import queue
import secrets
import string
import threading
import time
import warnings
from typing import Any, Callable, Mapping

from adapt_pretrain.logs import get_logger
from adapt_pretrain.monitor.config import WandbConfig

CURRICULUM_KEY = "curriculum/mean_weight"
CURRICULUM_MAX_POINTS = 200
RUN_ID_FILE = "wandb_run_id"  # in the run directory: one training run (with its resumes) is one W&B run
log = get_logger(__name__)


class WandbMirror:
    """Mirrors a Monitor's steps and events to one W&B run (rank 0 only; the Monitor decides).

    record_event(line): writes an event line into the local log (the mirror reports its own failures
    and fallbacks there); config: the run's configuration, given to wandb.init.
    """

    def __init__(self, cfg: WandbConfig, run_dir: str, config: Mapping[str, Any],
                 record_event: Callable[[dict[str, Any]], None]) -> None:
        self.cfg, self.run_dir, self.config = cfg, run_dir, dict(config)
        self._record = record_event
        self.run: Any = None
        self.mode = "disabled"  # the W&B mode actually running (offline after a failed online start)
        self._wandb: Any = None
        self._warned = False
        self._last_step: int | None = None
        self._curriculum: dict[str, list[tuple[int, float]]] = {}
        self._last_curriculum_step: int | None = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._start()
        if self.run is not None and cfg.background:
            self._queue = queue.Queue(maxsize=1000)  # bounded: a stalled W&B slows training, never OOMs it
            self._thread = threading.Thread(target=self._worker, name="adapt-monitor-wandb", daemon=True)
            self._thread.start()

    # ----- what the Monitor calls
    def log_step(self, step: int, scalars: dict[str, float], hists: dict[str, dict[str, list[float]]],
                 tables: dict[str, list[dict[str, Any]]] | None, table_due: bool) -> None:
        """The same values as the local line, at the same step (plus the curriculum chart on table steps)."""
        self._last_step = step
        for key, value in scalars.items():
            if key.startswith("domain/") and key.endswith("/mean_weight"):
                self._curriculum.setdefault(key[len("domain/"):-len("/mean_weight")], []).append((step, value))
        if self.run is None:
            return
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
        if table_due:
            self._log_curriculum(step)

    def log_event(self, step: int, name: str, fields: Mapping[str, Any]) -> None:
        """Numeric fields as `event/<name>/<field>`; an event without any as `event/<name>/count`."""
        data = {f"event/{name}/{k}": v for k, v in fields.items() if isinstance(v, (int, float, bool))}
        data = data or {f"event/{name}/count": 1}
        self._submit(lambda run: run.log(data, step=int(step)))

    def finish(self, timeout: float) -> None:
        """Final curriculum chart, drain the worker (give up after `timeout` s: a hung network must not
        hang the job's exit) and finish the run."""
        if self.run is not None and self._last_step is not None and self._last_curriculum_step != self._last_step:
            self._log_curriculum(self._last_step)
        if self._thread is not None:
            assert self._queue is not None
            try:
                self._queue.put(None, timeout=timeout)
            except queue.Full:
                pass
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._warn("drain", TimeoutError(f"W&B worker still busy after {timeout:.0f} s"))
                self.run = None
            self._thread = None
        if self.run is not None:
            run = self.run
            self._guard(run.finish, "finish")
            self.run = None

    def describe(self) -> dict[str, Any]:
        """The mirror's part of monitor.json: mode, project, run id and directory, the sync command."""
        run = self.run
        out = {
            "mode": self.mode if run is not None else "disabled",
            "project": self.cfg.project,
            "run_id": getattr(run, "id", None),
            "run_dir": getattr(getattr(run, "settings", None), "sync_dir", None) if run is not None else None,
        }
        if out["mode"] == "offline" and out["run_dir"]:
            out["sync_command"] = self.sync_command()
        return out

    def sync_command(self) -> str:
        """`wandb sync` for every offline start of this run, in start order, into one W&B run."""
        run_id = getattr(self.run, "id", None) or "ID"
        sync_dir = getattr(getattr(self.run, "settings", None), "sync_dir", None)
        wandb_dir = os.path.dirname(sync_dir) if sync_dir else os.path.join(self.cfg.dir or self.run_dir, "wandb")
        return f"wandb sync --id {run_id} {wandb_dir}/offline-run-*-{run_id}"

    # ----- start
    def _start(self) -> None:
        mode = self.cfg.resolved_mode()
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
            self.run = self._start_run(mode, run_id, resuming)
            self.mode = mode
            return
        except Exception as exc:  # noqa: BLE001 - W&B must never stop training
            if mode != "online" or not self.cfg.offline_fallback:
                self._warn("init", exc)
                return
            failure, waited = exc, time.monotonic() - t0
        try:
            wandb.teardown()  # the failed online attempt still holds the run id inside W&B's service
        except Exception:  # noqa: BLE001
            pass
        try:
            self.run = self._start_run("offline", run_id, resuming)
        except Exception as exc:  # noqa: BLE001
            self._warn("init", exc)
            return
        self.mode = "offline"
        log.warning(f"adapt-pretrain monitor: W&B online start failed after {waited:.0f} s "
                    f"({type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}); "
                    f"logging to an OFFLINE W&B run instead. Upload it later with: {self.sync_command()}")
        self._record({"step": None, "time": time.time(), "event": "wandb_offline_fallback",
                      "fields": {"error": f"{type(failure).__name__}: {failure}", "waited_s": round(waited, 1),
                                 "sync_command": self.sync_command()}})

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
        cfg, wandb = self.cfg, self._wandb
        return wandb.init(
            project=cfg.project, entity=cfg.entity, name=cfg.name, group=cfg.group,
            tags=list(cfg.tags) or None, mode=mode, dir=cfg.dir or self.run_dir,
            config=self.config, reinit="finish_previous", id=run_id,
            resume="allow" if resuming else None, allow_val_change=resuming or None,
            settings=wandb.Settings(init_timeout=cfg.init_timeout),
        )

    # ----- logging machinery
    def _log_curriculum(self, step: int) -> None:
        """One W&B chart with a line per domain (W&B has no built-in multi-key line chart)."""
        if not self._curriculum or self.run is None:
            return
        wandb = self._wandb
        domains = sorted(self._curriculum)
        xs, ys = [], []
        for d in domains:
            pts = self._curriculum[d]
            stride = max(1, math.ceil(len(pts) / CURRICULUM_MAX_POINTS))
            pts = pts[::stride] + ([pts[-1]] if (len(pts) - 1) % stride else [])
            xs.append([p[0] for p in pts])
            ys.append([p[1] for p in pts])

        def log_chart(run: Any) -> None:
            chart = wandb.plot.line_series(xs=xs, ys=ys, keys=domains, title="Per-domain mean weight", xname="step")
            run.log({CURRICULUM_KEY: chart}, step=step)

        self._submit(log_chart)
        self._last_curriculum_step = step

    def _submit(self, fn: Callable[[Any], None]) -> None:
        """Run `fn(run)`: on the worker thread when background, else now; failures disable the mirror."""
        if self.run is None:
            return
        if self._queue is not None:
            self._queue.put(fn)
        else:
            run = self.run
            self._guard(lambda: fn(run), "log")

    def _worker(self) -> None:
        assert self._queue is not None
        while True:
            fn = self._queue.get()
            if fn is None:
                return
            run = self.run
            if run is not None:
                self._guard(lambda: fn(run), "log")

    def _guard(self, fn: Any, what: str) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - W&B must never stop training
            self.run = None  # wandb's own atexit hook finishes a half-broken run; do not block here
            self._warn(what, exc)
            return None

    def _warn(self, what: str, exc: BaseException) -> None:
        if self._warned:
            return
        self._warned = True
        msg = (f"adapt-pretrain monitor: W&B {what} failed ({type(exc).__name__}: {exc}); "
               "W&B mirror turned off, local metrics.jsonl continues")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)  # once: callers and tests catch it as a warning
        self._record({"step": self._last_step, "time": time.time(), "event": "wandb_disabled",
                      "fields": {"stage": what, "error": f"{type(exc).__name__}: {exc}"}})
