"""`StepProfiler`: torch.profiler over a few steps of a real run, a Chrome trace per rank.

Why a callback: profiling is the first thing to reach for when MFU is low, and it must not need an
edit to the loop or a separate script. Turn it on from the config:
    train.callbacks=[{target: adapt_pretrain.training.callbacks.profiler:StepProfiler, start: 10, steps: 3}]
The traces go to <run_dir>/profile/rank<R>_steps<A>-<B>.json (open in https://ui.perfetto.dev or
chrome://tracing); the logging rank also logs a `profile` event and the top operators by self time.
"""
from __future__ import annotations

import os
from typing import Any, Optional

from adapt_pretrain.config.base import Rule
from adapt_pretrain.logs import get_logger
from adapt_pretrain.training.callbacks.base import Callback

log = get_logger(__name__)


class StepProfiler(Callback):
    """Profile steps start .. start + steps - 1 (CPU, and CUDA when present); nothing outside them.

    out_dir: where the traces go (default <run_dir>/profile); record_shapes / with_stack: torch.profiler's
    options (more detail, bigger traces); top: how many operators the summary lists.
    """

    order = -20  # starts before every other callback's step work and stops after the step itself

    def __init__(self, start: int = 5, steps: int = 3, out_dir: Optional[str] = None, record_shapes: bool = False,
                 with_stack: bool = False, top: int = 10) -> None:
        self.start = Rule("integer", minimum=0).apply("StepProfiler start", start)
        self.steps = Rule("integer", minimum=1).apply("StepProfiler steps", steps)
        self.top = Rule("integer", minimum=0).apply("StepProfiler top", top)
        self.out_dir = Rule("text", optional=True).apply("StepProfiler out_dir", out_dir)
        self.record_shapes = Rule("flag").apply("StepProfiler record_shapes", record_shapes)
        self.with_stack = Rule("flag").apply("StepProfiler with_stack", with_stack)
        self.trace_path: Optional[str] = None
        self._profile: Any = None
        self._first = -1

    def on_step_start(self, trainer: Any, step: int) -> None:
        if self._profile is None and self.start <= step < self.start + self.steps and self.trace_path is None:
            import torch

            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profile = torch.profiler.profile(activities=activities, record_shapes=self.record_shapes,
                                                   with_stack=self.with_stack)
            self._profile.__enter__()
            self._first = step

    def on_step_end(self, trainer: Any, step: int, out: Any) -> None:
        if self._profile is not None and step >= self.start + self.steps - 1:
            self._finish(trainer, step)

    def on_run_exit(self, trainer: Any) -> None:
        if self._profile is not None:  # the run ended inside the window: keep what was profiled
            self._finish(trainer, trainer.state.step - 1)

    def _finish(self, trainer: Any, last: int) -> None:
        profile, self._profile = self._profile, None
        profile.__exit__(None, None, None)
        out_dir = self.out_dir or os.path.join(trainer.run_dir, "profile")
        os.makedirs(out_dir, exist_ok=True)
        self.trace_path = os.path.join(out_dir, f"rank{trainer.info.rank}_steps{self._first}-{last}.json")
        profile.export_chrome_trace(self.trace_path)
        if trainer.info.is_logging_rank:
            sort = "self_cuda_time_total" if "CUDA" in str(profile.activities) else "self_cpu_time_total"
            log.info(f"profile of steps {self._first}-{last} written to {self.trace_path}; top operators:\n"
                     + profile.key_averages().table(sort_by=sort, row_limit=self.top))
            trainer.monitor.log_event(last, "profile", trace=self.trace_path, first_step=self._first, last_step=last)
