"""Anchor centroid state: the mean unit embedding of the anchor set under the current model.

Encoding happens outside (a forward-only pass, sharded over data-parallel ranks); this object only
holds the result and the refresh schedule, so it is cheap to checkpoint and identical on every rank
once the caller has all-reduced the partial sums it feeds in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AnchorState:
    refresh_interval: int
    centroid: torch.Tensor | None = None
    last_refresh_step: int = -1
    num_refreshes: int = 0

    def needs_refresh(self, step: int) -> bool:
        """True at step 0 (or the first step seen without a centroid) and every `refresh_interval` steps."""
        if self.centroid is None:
            return True
        return step % self.refresh_interval == 0 and step != self.last_refresh_step

    def update(self, unit_sum: torch.Tensor, count: torch.Tensor | float, step: int) -> dict[str, float]:
        """Set the centroid from all-reduced sums of anchor unit vectors; returns how far it moved."""
        count_value = float(count)
        if count_value <= 0:
            raise ValueError("anchor refresh saw no anchor document with a non-empty embedding")
        new = (unit_sum.detach().float() / count_value).clone()
        event: dict[str, float] = {"step": float(step), "anchors": count_value, "centroid_norm": float(new.norm())}
        if self.centroid is not None:
            old = self.centroid.to(new.device)
            event["centroid_shift"] = float((new - old).norm())
            event["centroid_cosine"] = float(torch.nn.functional.cosine_similarity(new, old, dim=0))
        self.centroid = new
        self.last_refresh_step = step
        self.num_refreshes += 1
        return event

    def state_dict(self) -> dict[str, Any]:
        return {
            "refresh_interval": self.refresh_interval,
            "centroid": None if self.centroid is None else self.centroid.cpu().clone(),
            "last_refresh_step": self.last_refresh_step,
            "num_refreshes": self.num_refreshes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.centroid = None if state["centroid"] is None else state["centroid"].clone()
        self.last_refresh_step = int(state["last_refresh_step"])
        self.num_refreshes = int(state["num_refreshes"])
