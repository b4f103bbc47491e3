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
from typing import Any, Iterator, Optional

import yaml

from adapt_pretrain.experiments.methods.plan import RunSpec

RESULT = "result.json"
RUN_CONFIG = "compare_run.yaml"
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


def _scalars_by_step(run_dir: str) -> dict[int, dict[str, float]]:
    """step -> scalars of the last record of that step in the run's metrics.jsonl (empty if none)."""
    from adapt_pretrain.monitor.monitor import read_metrics

    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        return {}
    steps, _ = read_metrics(run_dir)
    return {s: line["scalars"] for s, line in steps.items() if isinstance(line.get("scalars"), dict)}


def metrics_summary(run_dir: str) -> dict[str, float]:
    """Steps, summed token groups and final losses from the run's metrics.jsonl (last record per step)."""
    per_step = _scalars_by_step(run_dir)
    steps = sorted(per_step)
    groups = sum(float(per_step[s].get("adapt/groups", 0.0)) for s in steps)
    last = per_step[steps[-1]] if steps else {}

    def mean_of(key: str) -> float:
        values = [float(per_step[s][key]) for s in steps if key in per_step[s]]
        return float(sum(values) / len(values)) if values else float("nan")

    return {"steps_logged": len(steps), "groups": groups, "final_loss": float(last.get("loss", float("nan"))),
            "final_loss_unweighted": float(last.get("loss/mean", last.get("loss", float("nan")))),
            "weight_std_mean": mean_of("adapt/weight_std"), "ess_frac_mean": mean_of("adapt/ess_frac"),
            "domain_weight": domain_weights(per_step)}


def domain_shares(scalars: dict[str, float]) -> Iterator[tuple[str, float, float]]:
    """(domain, token share, weighted share) of one step's monitor scalars, for domains present in it;
    weighted share / token share is the domain's mean weight relative to the step's mean weight (a run
    without weights logs no weighted share: 1)."""
    for key, share in scalars.items():
        if key.startswith("domain/") and key.endswith("/token_share") and share > 0:
            d = key[len("domain/"):-len("/token_share")]
            yield d, float(share), float(scalars.get(f"domain/{d}/weighted_share", share))


def domain_weights(per_step: dict[int, dict[str, float]]) -> dict[str, float]:
    """Each domain's token-weighted mean weight over the run, relative to the run's mean weight (1 = uniform)."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for sc in per_step.values():
        for d, share, weighted in domain_shares(sc):
            num[d] = num.get(d, 0.0) + weighted
            den[d] = den.get(d, 0.0) + share
    return {d: num[d] / den[d] for d in sorted(num) if den[d] > 0}


def weight_curves(run_dir: str) -> dict[str, tuple[list[int], list[float]]]:
    """domain -> (steps, the domain's mean token weight relative to the step's mean weight): the weight
    curriculum of an online method, step by step."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for step, sc in sorted(_scalars_by_step(run_dir).items()):
        for d, share, weighted in domain_shares(sc):
            steps, values = out.setdefault(d, ([], []))
            steps.append(step)
            values.append(weighted / share)
    return out


def loss_curve(run_dir: str, key: str = "loss/mean") -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar from metrics.jsonl (falls back to `loss`)."""
    per_step = {s: sc.get(key, sc.get("loss")) for s, sc in _scalars_by_step(run_dir).items()}
    steps = sorted(s for s, v in per_step.items() if v is not None)
    return steps, [float(per_step[s]) for s in steps]
