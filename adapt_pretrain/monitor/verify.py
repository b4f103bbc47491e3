"""Check that the W&B offline run of a run directory holds the same values as its metrics.jsonl.

Why: the local file is what we plot and trust; W&B is what users look at. This reads W&B's own
`.wandb` log (wandb_reader) and compares every scalar, histogram, table and event field, so an
end-to-end test (or a user) can see that the two agree. `python -m adapt_pretrain.monitor.verify RUN_DIR`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from adapt_pretrain.monitor.monitor import read_metrics
from adapt_pretrain.monitor.wandb_reader import find_run_file, read_complete_run, read_run


@dataclass
class MirrorCheck:
    """Outcome: how much was compared and every difference found (empty `mismatches` = equal)."""

    wandb_file: str
    complete: bool = True  # False: the W&B log had no exit record (run killed); only its steps were compared
    steps: int = 0
    values: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.values > 0


def _close(a: Any, b: Any, rel: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-15)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    return a == b


def verify_wandb_mirror(run_dir: str, timeout: float = 30.0, rel: float = 1e-12,
                        allow_incomplete: bool = False) -> MirrorCheck:
    """Compare metrics.jsonl with the newest `.wandb` file under run_dir (waits up to `timeout` for it
    to be closed). allow_incomplete: for a killed run, compare the steps W&B has and ignore the
    local tail that never reached W&B's file."""
    path = find_run_file(run_dir)
    if allow_incomplete:
        run = read_run(path, strict=False)
    else:
        run = read_complete_run(path, timeout=timeout)
    steps, events = read_metrics(run_dir)
    check = MirrorCheck(path, complete=run.complete)
    local_steps = set(steps) | {ev["step"] for ev in events if ev.get("step") is not None}
    for step in sorted(set(run.history) - local_steps):
        check.mismatches.append(f"step {step}: in W&B but not in metrics.jsonl")
    if not run.complete and run.history:
        last = max(run.history)
        steps = {s: line for s, line in steps.items() if s < last}  # the last W&B row may be partial
        events = [ev for ev in events if ev.get("step") is not None and ev["step"] < last]
    files_dir = os.path.join(os.path.dirname(path), "files")
    for step, line in steps.items():
        row = run.history.get(step)
        if row is None:
            check.mismatches.append(f"step {step}: missing in W&B")
            continue
        check.steps += 1
        for key, value in line.get("scalars", {}).items():
            check.values += 1
            if not _close(row.get(key), value, rel):
                check.mismatches.append(f"step {step} {key}: W&B {row.get(key)!r} != local {value!r}")
        for key, h in line.get("histograms", {}).items():
            check.values += 1
            got = row.get(key) or {}
            if got.get("_type") != "histogram" or not (_close(got.get("values"), h["counts"], rel)
                                                       and _close(got.get("bins"), h["bins"], rel)):
                check.mismatches.append(f"step {step} {key}: histogram differs")
        for key, rows in line.get("tables", {}).items():
            check.values += 1
            meta = row.get(key) or {}
            try:
                with open(os.path.join(files_dir, meta["path"]), encoding="utf-8") as fh:
                    table = json.load(fh)
                got_rows = [dict(zip(table["columns"], r)) for r in table["data"]]
            except (KeyError, OSError, ValueError) as exc:
                check.mismatches.append(f"step {step} {key}: table unreadable ({exc})")
                continue
            if not _close(got_rows, rows, rel):
                check.mismatches.append(f"step {step} {key}: table differs")
    for ev in events:
        if ev.get("event") == "wandb_disabled":
            check.mismatches.append(f"W&B was disabled during the run: {ev.get('fields')}")
            continue
        if ev.get("step") is None:
            continue  # the monitor's own note from before the first step (e.g. an offline fallback): local only
        row = run.history.get(ev["step"], {})
        for name, value in ev.get("fields", {}).items():
            if isinstance(value, (int, float, bool)):
                check.values += 1
                key = f"event/{ev['event']}/{name}"
                if not _close(row.get(key), value, rel):
                    check.mismatches.append(f"step {ev['step']} {key}: W&B {row.get(key)!r} != local {value!r}")
    return check


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adapt_pretrain.monitor.verify",
                                description="compare a run directory's W&B offline run with its metrics.jsonl; "
                                            "exit 0 when they agree, 1 on a difference, 2 on a usage error")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (holds metrics.jsonl and wandb/)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="the run was killed: compare the steps W&B has and ignore the local tail it never got")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check = verify_wandb_mirror(args.run_dir, allow_incomplete=args.allow_incomplete)
    print(f"{check.wandb_file}: {check.steps} steps, {check.values} values compared, "
          f"{len(check.mismatches)} mismatches{'' if check.complete else ' (W&B log incomplete: run killed?)'}")
    for m in check.mismatches[:20]:
        print("  " + m)
    return 0 if check.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
