"""Scores -> weights: w = clip(sigmoid(z / tau), w_min, w_max), detached.

`RunningScoreStats` supports `standardize`: scores are z-scored with an EMA of the global batch's
mean and variance. The statistics used in a step are those from the end of the previous step, so
every data-parallel rank and every micro-batch of a step applies the same transform whatever the
parallel layout (the step's own statistics are only known after all micro-batches ran).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from adapt_pretrain.kernels.reference import weights_from_scores  # noqa: F401 - the one weight formula


@dataclass
class RunningScoreStats:
    """EMA of the mean and variance of scores over global batches."""

    momentum: float = 0.5
    mean: float = 0.0
    var: float = 1.0
    initialized: bool = False
    eps: float = 1e-6

    @staticmethod
    def partial_sums(scores: torch.Tensor) -> torch.Tensor:
        """[count, sum, sum of squares] of local scores: all-reduce these over DP ranks."""
        s = scores.detach().double()
        return torch.stack([torch.tensor(float(s.numel()), dtype=torch.float64, device=s.device), s.sum(), (s * s).sum()])

    def update(self, reduced: torch.Tensor) -> None:
        """Fold one global batch's reduced [count, sum, sumsq] into the running statistics."""
        count, total, total_sq = (float(x) for x in reduced.cpu())
        if count <= 0:
            return
        batch_mean = total / count
        batch_var = max(total_sq / count - batch_mean * batch_mean, 0.0)
        if not self.initialized:
            self.mean, self.var, self.initialized = batch_mean, batch_var, True
            return
        m = self.momentum
        self.mean = m * self.mean + (1 - m) * batch_mean
        self.var = m * self.var + (1 - m) * batch_var

    def reset(self, reduced: torch.Tensor) -> bool:
        """Replace the statistics by one global batch's [count, sum, sumsq]; False if it was empty."""
        if float(reduced[0]) <= 0:
            return False
        self.initialized = False
        self.update(reduced)
        return True

    @property
    def std(self) -> float:
        return (self.var + self.eps) ** 0.5

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "initialized": self.initialized}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.initialized = float(state["mean"]), float(state["var"]), bool(state["initialized"])
