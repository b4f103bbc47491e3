"""New behaviour as a callback, without touching the loop; a callback's state survives a resume.

One real gloo process (spawned, so megatron's global state stays out of the test process) runs a
`Trainer` with two user callbacks: an early stop after 3 of 6 steps and an "evaluation" every 2 steps
that adds a scalar to the metrics line and keeps the steps it ran at as state. A second `Trainer`
resumes the run dir: the evaluation's state and the metrics callback's counters (tokens, samples)
come back from the checkpoint, and the run continues to step 6.
"""
from __future__ import annotations

import os

from adapt_pretrain.training.callbacks import Callback
from tests.distributed_helper import run_distributed

from .conftest import TINY_MODEL

STEPS, STOP_AT = 6, 3


class StopAfter(Callback):
    """Ends the run once `steps` steps are done (what train.stop_at_step does, as a callback)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, trainer, step, out) -> None:
        if trainer.state.step >= self.steps:
            trainer.request_stop(f"stop after {self.steps} steps")


class EveryNEval(Callback):
    """A stateful 'evaluation' every n steps: it logs eval/runs and remembers where it ran."""

    name = "every_n_eval"

    def __init__(self, n: int) -> None:
        self.n = n
        self.ran_at: list[int] = []

    def add_metrics(self, trainer, step, out, metrics) -> None:
        if step % self.n == 0:
            self.ran_at.append(step)
            metrics.scalars["eval/runs"] = float(len(self.ran_at))

    def state_dict(self):
        return {"ran_at": list(self.ran_at)}

    def load_state_dict(self, state) -> None:
        self.ran_at = list(state["ran_at"])


class HookOrder(Callback):
    """Records the hooks of each step as the loop fires them (runs after every other callback)."""

    order = 1000

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def on_step_end(self, trainer, step, out) -> None:
        self.seen.append(("on_step_end", step))

    def add_metrics(self, trainer, step, out, metrics) -> None:
        self.seen.append(("add_metrics", step, "loss" in metrics.scalars))  # the metrics callback's are in

    def log_metrics(self, trainer, step, metrics) -> None:
        self.seen.append(("log_metrics", step))

    def on_step_done(self, trainer, step, out) -> None:
        from adapt_pretrain.monitor import read_metrics

        self.seen.append(("on_step_done", step, step in read_metrics(trainer.run_dir)[0]))  # logged before saving


def _overrides(data_dir: str, run_dir: str) -> list[str]:
    return [*TINY_MODEL, f"data.data_dir={data_dir}", "data.num_workers=0", f"train.run_dir={run_dir}",
            f"train.steps={STEPS}", "train.micro_batch_size=2", "train.global_batch_size=4",
            "train.progress_bar=false", "train.checkpoint_interval=2", "optim.warmup_steps=1",
            "adapt.enabled=true", "adapt.num_anchors=8", "wandb.enabled=false"]


def _stop_then_resume(rank: int, world: int, data_dir: str, run_dir: str) -> dict:
    from adapt_pretrain.deepspeed.launcher import read_dist_env
    from adapt_pretrain.megatron import teardown_parallel
    from adapt_pretrain.config import load_run_config
    from adapt_pretrain.training.callbacks import MetricsLogger
    from adapt_pretrain.training.trainer import Trainer

    order = HookOrder()
    first = Trainer(load_run_config(None, _overrides(data_dir, run_dir)), read_dist_env(),
                    callbacks=[StopAfter(STOP_AT), EveryNEval(2), order])
    stopped = first.run()
    counters = first.callbacks.find(MetricsLogger).state_dict()
    first.close()
    teardown_parallel()
    evaluation = EveryNEval(2)
    second = Trainer(load_run_config(None, _overrides(data_dir, run_dir)), read_dist_env(), resume="auto",
                     callbacks=[evaluation])
    restored = {"ran_at": list(evaluation.ran_at), "counters": second.callbacks.find(MetricsLogger).state_dict(),
                "step": second.state.step}
    resumed = second.run()
    second.close()
    teardown_parallel()
    return {"stopped": (stopped.steps_run, stopped.final_step), "counters": counters, "restored": restored,
            "resumed": (resumed.steps_run, resumed.final_step), "ran_at": evaluation.ran_at,
            "hooks": order.seen}


def test_callbacks_stop_early_evaluate_and_resume(demo_data_dir, tmp_path):
    from adapt_pretrain.monitor import read_metrics

    run_dir = str(tmp_path / "run")
    (out,) = run_distributed(_stop_then_resume, 1, demo_data_dir, run_dir, timeout=400)
    assert out["stopped"] == (STOP_AT, STOP_AT)  # the early stop ended the loop after step 3 of 6
    assert "step_000003" in os.listdir(os.path.join(run_dir, "checkpoints"))  # the final save still happened
    tokens_per_step = 4 * 32  # at most: 4 sequences of 32 tokens
    assert out["counters"]["consumed_samples"] == 4 * STOP_AT
    assert 0 < out["counters"]["tokens"] <= tokens_per_step * STOP_AT
    assert out["restored"] == {"ran_at": [0, 2], "counters": out["counters"], "step": STOP_AT}
    assert out["resumed"] == (STEPS - STOP_AT, STEPS) and out["ran_at"] == [0, 2, 4]
    steps, _ = read_metrics(run_dir)
    assert sorted(steps) == list(range(STEPS))
    assert {s: line["scalars"].get("eval/runs") for s, line in steps.items() if "eval/runs" in line["scalars"]} \
        == {0: 1.0, 2: 2.0, 4: 3.0}
    assert steps[STEPS - 1]["scalars"]["train/consumed_samples"] == 4 * STEPS
    # the loop owns the order: react, add to the line, publish it, then persist (a checkpoint never
    # holds a step whose metrics line is not written yet)
    assert out["hooks"] == [hook for step in range(STOP_AT) for hook in (
        ("on_step_end", step), ("add_metrics", step, True), ("log_metrics", step), ("on_step_done", step, True))]


# ----- callbacks named in the config (train.callbacks) ------------------------------------------------

def _config(*overrides: str):
    from adapt_pretrain.config import load_run_config

    return load_run_config(None, [*TINY_MODEL, "data.data_dir=/not/read/here", *overrides])


def test_configured_callbacks_are_built_with_their_arguments_after_the_runs_own():
    from adapt_pretrain.training.callbacks import default_callbacks

    cfg = _config("train.callbacks=[{target: tests.e2e.test_callbacks:StopAfter, steps: 2}, "
                  "{target: tests.e2e.test_callbacks:EveryNEval, n: 3}]")
    built = default_callbacks(cfg)
    assert [type(c).__name__ for c in built[-2:]] == ["StopAfter", "EveryNEval"]
    assert built[-1].n == 3 and built[-2].steps == 2 and not isinstance(built[0], (StopAfter, EveryNEval))


def test_configured_callback_problems_name_the_entry():
    import pytest

    from adapt_pretrain.config import ConfigError
    from adapt_pretrain.training.callbacks import default_callbacks

    cases = {
        "train.callbacks=[tests.e2e.test_callbacks]": 'train.callbacks[0]=',  # no ":Name"
        "train.callbacks=[no_such_package.mod:X]": "cannot import no_such_package.mod",
        "train.callbacks=[tests.e2e.test_callbacks:EveryNEvl]": "did you mean tests.e2e.test_callbacks:EveryNEval",
        "train.callbacks=[{target: tests.e2e.test_callbacks:EveryNEval, m: 2}]": "unexpected keyword argument 'm'",
        "train.callbacks=[os:getcwd]": "not a Callback",
        "train.callbacks=[{target: adapt_pretrain.training.callbacks.profiler:StepProfiler, steps: 0}]": "steps=0 must be >= 1",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match="train.callbacks") as err:
            default_callbacks(_config(override))
        assert message in str(err.value), (override, str(err.value))


def test_profiler_from_the_command_line_writes_a_trace_of_its_steps(demo_data_dir, tmp_path):
    """The launcher path: `train.callbacks=[...]` on the command line turns the profiler on for steps
    1-2 of 4; the trace holds those steps' operators and a `profile` event points at it."""
    import json

    from .helpers import events, train_plain

    run_dir = str(tmp_path / "run")
    train_plain([*_overrides(demo_data_dir, run_dir), "train.steps=4", "train.checkpoint_interval=0",
                 "train.callbacks=[{target: adapt_pretrain.training.callbacks.profiler:StepProfiler, start: 1, "
                 "steps: 2}]"])
    [event] = events(run_dir, "profile")
    assert event["fields"]["first_step"] == 1 and event["fields"]["last_step"] == 2
    trace = event["fields"]["trace"]
    assert trace == os.path.join(run_dir, "profile", "rank0_steps1-2.json")
    names = {e.get("name", "") for e in json.load(open(trace))["traceEvents"]}
    assert any("aten::mm" in n or "aten::addmm" in n or "aten::matmul" in n for n in names), sorted(names)[:20]
