"""`Callback`: one concern of a run (checkpoints, non-finite policy, metrics, console, ...) with its own state.

The trainer's loop only calls the hooks below, in `order` (then registration order). A callback with
state that must survive a resume returns it from `state_dict` (JSON-serialisable, identical on every
rank: rank 0 writes it into the checkpoint's loop.json under the callback's `name`) and takes it back
in `load_state_dict`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from adapt_pretrain.logs import get_logger

log = get_logger(__name__)


@dataclass
class StepLog:
    """One step's metrics line, assembled before it is logged (callbacks may add to it in `add_metrics`)."""

    scalars: dict[str, float] = field(default_factory=dict)
    histograms: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class Callback:
    """Hooks of a training run; every one is optional. `trainer` is the running `Trainer`.

    order: callbacks run by ascending order: the non-finite policy first (a stop happens before the step
    is logged), the checkpointer last (a checkpoint holds the state every other callback reached).
    """

    name: str = ""  # key of this callback's state in a checkpoint; the class name when empty
    order: int = 0

    @property
    def state_key(self) -> str:
        return self.name or type(self).__name__

    def on_setup(self, trainer: Any) -> None:
        """The trainer is built (parts loaded, a resume applied); nothing has run yet."""

    def on_run_start(self, trainer: Any, start: int, end: int) -> None:
        """`run()` is about to run steps start..end-1."""

    def on_step_start(self, trainer: Any, step: int) -> None:
        """Step `step` is about to run (before its anchor refresh and data)."""

    def on_anchor_refresh(self, trainer: Any, step: int, info: dict[str, Any], elapsed_s: float) -> None:
        """The anchors were re-encoded before step `step`."""

    def on_step_end(self, trainer: Any, step: int, out: Any) -> None:
        """Step `step` ran (`out`: its megatron/step.StepResult); `trainer.state.step` is already step + 1."""

    def add_metrics(self, trainer: Any, step: int, out: Any, metrics: StepLog) -> None:
        """Add scalars, histograms or tables to step `step`'s metrics line (after every `on_step_end`)."""

    def log_metrics(self, trainer: Any, step: int, metrics: StepLog) -> None:
        """Publish step `step`'s complete metrics line (the run log, the console)."""

    def on_step_done(self, trainer: Any, step: int, out: Any) -> None:
        """Step `step` is complete and logged: persist what must survive it (checkpoints, heartbeats)."""

    def on_run_end(self, trainer: Any, result: Any) -> None:
        """The loop ended normally (`result`: the RunResult so far). May raise to fail the run."""

    def on_run_exit(self, trainer: Any) -> None:
        """`run()` is returning or raising: release what `on_run_start` took."""

    def close(self) -> None:
        """The trainer is closed."""

    def state_dict(self) -> dict[str, Any] | None:
        """State a resume must restore, or None (nothing to save)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


class CallbackList:
    """The run's callbacks in calling order; `fire` calls one hook on each."""

    def __init__(self, callbacks: Iterable[Callback]) -> None:
        self.callbacks = sorted(callbacks, key=lambda c: c.order)  # stable: registration order within an order
        keys = [c.state_key for c in self.callbacks if c.state_dict() is not None]
        clashes = sorted({k for k in keys if keys.count(k) > 1})
        if clashes:
            raise ValueError(f"callbacks with state share the name(s) {clashes}: give each a distinct `name`")

    def __iter__(self):
        return iter(self.callbacks)

    def fire(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(*args)

    def find(self, kind: type) -> Any:
        """The first callback of type `kind`, or None."""
        return next((c for c in self.callbacks if isinstance(c, kind)), None)

    def state_dicts(self) -> dict[str, dict[str, Any]]:
        states = {c.state_key: c.state_dict() for c in self.callbacks}
        return {key: state for key, state in states.items() if state is not None}

    def load_state_dicts(self, states: dict[str, dict[str, Any]], rank: int) -> None:
        """Give each stateful callback its saved state; one without (added since the save) starts fresh."""
        for callback in self.callbacks:
            key = callback.state_key
            if key in states:
                callback.load_state_dict(states[key])
            elif callback.state_dict() is not None and rank == 0:
                log.info(f"callback {key}: no state in the checkpoint (added since it was written); starting fresh")
        known = {c.state_key for c in self.callbacks}
        unused = sorted(set(states) - known)
        if unused and rank == 0:
            log.info(f"checkpoint holds state of callbacks not registered now, ignored: {', '.join(unused)}")
