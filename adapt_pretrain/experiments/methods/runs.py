"""Run bookkeeping of the comparison: what is finished, what to (re)start, how to launch it.

A run is finished when its directory holds `result.json` with the fingerprint of its current
config; then it is skipped. A directory whose config differs is stale and is wiped before the run
restarts. A run interrupted mid-training restarts with `--resume`, continuing from its last
checkpoint when the trainer saved one. Training and eval run as subprocesses: a crash of one run
is reported with its log tail and does not take the comparison down with it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any, Optional

import yaml

from adapt_pretrain.evaluate import COMPARE_RESULT, COMPARE_RUN_CONFIG
from adapt_pretrain.experiments.methods.plan import RunSpec

RESULT = COMPARE_RESULT
RUN_CONFIG = COMPARE_RUN_CONFIG
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")


def read_json(path: str) -> Optional[Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path: str, value: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(value, fh, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


def cached_result(spec: RunSpec) -> Optional[dict[str, Any]]:
    """The run's stored result if it was produced by this exact config, else None."""
    result = read_json(os.path.join(spec.run_dir, RESULT))
    if isinstance(result, dict) and result.get("fingerprint") == spec.fingerprint:
        return result
    return None


def pending(specs: list[RunSpec]) -> list[RunSpec]:
    """Runs without a valid cached result, in plan order."""
    return [s for s in specs if cached_result(s) is None]


def prepare_run_dir(spec: RunSpec) -> bool:
    """Create the run dir and its config file; wipe it first if it belongs to another config.

    Returns True when earlier work of this same config is present (training may resume)."""
    path = os.path.join(spec.run_dir, RUN_CONFIG)
    resumable = False
    if os.path.isdir(spec.run_dir):
        old = None
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                old = yaml.safe_load(fh)
        if old == spec.config:
            resumable = True
        else:
            shutil.rmtree(spec.run_dir)
    os.makedirs(spec.run_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(spec.config, fh, sort_keys=True)
    return resumable


def train_command(spec: RunSpec) -> list[str]:
    return [sys.executable, "-m", "adapt_pretrain.cli", "train", "--config",
            os.path.join(spec.run_dir, RUN_CONFIG), "--resume"]


def subprocess_env(threads: Optional[int] = None) -> dict[str, str]:
    """Our environment without a launcher's rank variables (each subprocess is its own 1-rank job)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("WANDB_SILENT", "true")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_logged(cmd: list[str], log_path: str, env: Optional[dict[str, str]] = None) -> None:
    """Run `cmd` with output appended to `log_path`; raise RuntimeError with the log tail on failure."""
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env or subprocess_env())
    if code != 0:
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            tail = fh.read()[-3000:]
        raise RuntimeError(f"command failed with exit code {code}: {' '.join(cmd)}\n--- {log_path} (tail) ---\n{tail}")
