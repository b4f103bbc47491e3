"""`AdaptEngine`: the method in one object, free of megatron/deepspeed so any trainer can host it.

A trainer calls, on the stage that has the final hidden states and logits:
  1. `needs_anchor_refresh(step)` -> if so, for each anchor micro-batch `anchor_partial(...)`,
     all-reduce the sums over data-parallel ranks, then `finish_anchor_refresh(...)`;
  2. per micro-batch: `group_weights(...)` then `loss(...)` -> (loss_sum, normaliser, ...);
  3. once per step, after all micro-batches: `end_step(all_reduce_sum, all_reduce_max)`.
Shapes are flattened over the micro-batch: T = b * s tokens; hidden is [T, H] in the same token
order as group_ids/positions (megatron's [s, b, H] must be transposed to [b, s, H] first).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from adapt_pretrain.config import AdaptConfig
from adapt_pretrain.core.anchors import AnchorState
from adapt_pretrain.core.linupper import linupper_weights
from adapt_pretrain.core.loss import (LossTerms, counted_tokens, normaliser_for, plain_token_loss, token_weights,
                                      weighted_loss_terms)
from adapt_pretrain.core.pooling import pool_groups, unit_rows
from adapt_pretrain.core.weights import RunningScoreStats, weights_from_scores
from adapt_pretrain.kernels import score_and_weight

Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class GroupWeights:
    weights: torch.Tensor  # [G] fp32, detached
    scores: torch.Tensor   # [G] fp32 similarity (or static) scores; zeros when no signal is computed


def group_loss_means(token_loss: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor,
                     num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (sum of masked token losses, masked token count)."""
    valid = (group_ids >= 0).float() * loss_mask.float()
    ids = group_ids.clamp_min(0)
    sums = torch.zeros(num_groups, dtype=torch.float32, device=token_loss.device).index_add_(0, ids, token_loss.float() * valid)
    counts = torch.zeros(num_groups, dtype=torch.float32, device=token_loss.device).index_add_(0, ids, valid)
    return sums, counts


class AdaptEngine:
    """Per-step ADAPT weighting and loss; holds the anchor centroid and running statistics."""

    MAX_KEPT_EMBEDDINGS = 4096  # per rank: bounds the memory kept for re-estimating statistics

    def __init__(self, cfg: AdaptConfig):
        self.cfg = cfg
        self.anchors = AnchorState(cfg.refresh_interval)
        self.score_stats = RunningScoreStats(cfg.standardize_momentum)
        self.loss_range: tuple[float, float] | None = None  # LinUpper: previous global batch's (min, max)
        self._score_partials: torch.Tensor | None = None
        self._step_units: list[torch.Tensor] = []          # this step's unit embeddings (standardize)
        self._previous_units: torch.Tensor | None = None   # last step's, to re-estimate stats at a refresh
        self._loss_min: torch.Tensor | None = None
        self._loss_max: torch.Tensor | None = None

    # ----- which parts of the method are active -------------------------------------------------
    @property
    def uses_hidden_states(self) -> bool:
        return self.cfg.enabled and self.cfg.policy == "adapt" and self.cfg.signal == "embed"

    @property
    def _standardize_running(self) -> bool:
        return (self.cfg.enabled and self.cfg.policy == "adapt" and self.cfg.standardize
                and self.cfg.standardize_scope == "running")

    def weighting_active(self, step: int) -> bool:
        return self.cfg.enabled and self.cfg.policy != "uniform" and step >= self.cfg.warmup_steps

    def needs_anchor_refresh(self, step: int) -> bool:
        return self.uses_hidden_states and self.anchors.needs_refresh(step)

    # ----- anchors --------------------------------------------------------------------------------
    def anchor_partial(self, hidden: torch.Tensor, group_ids: torch.Tensor, positions: torch.Tensor,
                       num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of the unit embeddings of the anchor groups in this micro-batch, and their count."""
        unit, valid = unit_rows(pool_groups(hidden, group_ids, positions, num_groups))
        return unit.sum(dim=0), valid.sum().float()

    def finish_anchor_refresh(self, unit_sum: torch.Tensor, count: torch.Tensor, step: int,
                              all_reduce_sum: Reduce | None = None) -> dict[str, float]:
        """Set the centroid from all-reduced anchor sums (identical inputs give identical centroids).

        With `standardize`, a new centroid shifts every score at once, so statistics gathered under the
        old one would saturate the sigmoid. They are re-estimated here from the previous step's group
        embeddings scored against the new centroid (collective over DP when `all_reduce_sum` is given:
        call it on every rank).
        """
        event = self.anchors.update(unit_sum, count, step)
        if self._standardize_running and self.cfg.signal == "embed":
            centroid = self.anchors.centroid
            if self._previous_units is not None:
                partial = RunningScoreStats.partial_sums(self._previous_units @ centroid.to(self._previous_units.device))
            else:
                partial = torch.zeros(3, dtype=torch.float64, device=centroid.device)
            reduced = (all_reduce_sum or (lambda t: t))(partial)
            if self.score_stats.reset(reduced):
                event["score_mean"], event["score_std"] = self.score_stats.mean, self.score_stats.std
        return event

    # ----- weights --------------------------------------------------------------------------------
    def group_weights(self, hidden: torch.Tensor | None, group_ids: torch.Tensor, positions: torch.Tensor,
                      num_groups: int, step: int, static_scores: torch.Tensor | None = None) -> GroupWeights:
        """Weights for the G groups of one micro-batch (ones when ADAPT is off, uniform, or warming up)."""
        device = group_ids.device
        ones = torch.ones(num_groups, dtype=torch.float32, device=device)
        zeros = torch.zeros(num_groups, dtype=torch.float32, device=device)
        if not self.cfg.enabled or self.cfg.policy != "adapt":
            return GroupWeights(ones, zeros)
        running = self.cfg.standardize and self.cfg.standardize_scope == "running"
        standardized = running and self.score_stats.initialized
        mean, std = (self.score_stats.mean, self.score_stats.std) if standardized else (0.0, 1.0)
        if self.cfg.signal == "embed":
            if hidden is None:
                raise ValueError("adapt.signal=embed needs the final hidden states")
            if self.anchors.centroid is None:
                raise RuntimeError("anchor centroid not computed yet: refresh anchors before the first weighted step")
            pooled = pool_groups(hidden, group_ids, positions, num_groups)
            centroid = self.anchors.centroid.to(device=device, dtype=torch.float32)
            if running:
                self._step_units.append(unit_rows(pooled)[0])
            scores, weights = score_and_weight(pooled, centroid, self.cfg.tau, self.cfg.w_min, self.cfg.w_max, mean, std)
        else:
            if static_scores is None:
                raise ValueError(f"adapt.signal={self.cfg.signal} needs per-group scores from the shards (group_bm25)")
            scores = static_scores.float().to(device)
            weights = weights_from_scores(scores, self.cfg.tau, self.cfg.w_min, self.cfg.w_max, mean, std)
        if running:
            self._accumulate_scores(scores)
        elif self.cfg.standardize and num_groups > 0:  # scope micro_batch: z-score among batch-mates
            batch_std = scores.double().std(unbiased=False).clamp_min(1e-6)
            weights = weights_from_scores(scores, self.cfg.tau, self.cfg.w_min, self.cfg.w_max,
                                          float(scores.double().mean()), float(batch_std))
        if not self.weighting_active(step) or (running and not standardized):
            weights = ones  # warm-up, or no running statistics yet: uniform for this step
        return GroupWeights(weights.detach().float(), scores.detach().float())

    def _accumulate_scores(self, scores: torch.Tensor) -> None:
        partial = RunningScoreStats.partial_sums(scores)
        self._score_partials = partial if self._score_partials is None else self._score_partials + partial

    # ----- loss -----------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, group_ids: torch.Tensor,
             weights: torch.Tensor, step: int = 0, tp_group=None, vocab_start: int = 0,
             num_contributions: int = 1) -> LossTerms:
        """Weighted loss sum and normaliser for one micro-batch ([T, V_local] logits, [T] the rest)."""
        mode = self.cfg.normalize
        if not self.cfg.enabled:
            token_loss = plain_token_loss(logits, labels, tp_group, vocab_start)
            mask = loss_mask.float()
            return LossTerms((token_loss * mask).sum(), mask.sum().detach(), token_loss.detach(), weights.detach())
        if self.cfg.policy == "linupper":
            return self._linupper_loss(logits, labels, loss_mask, group_ids, weights.numel(), step, tp_group,
                                       vocab_start, num_contributions)
        return weighted_loss_terms(logits, labels, loss_mask, group_ids, weights, mode, tp_group, vocab_start,
                                   num_contributions)

    def _linupper_loss(self, logits, labels, loss_mask, group_ids, num_groups, step, tp_group, vocab_start,
                       num_contributions) -> LossTerms:
        token_loss = plain_token_loss(logits, labels, tp_group, vocab_start)
        counted = counted_tokens(loss_mask, labels, group_ids)  # a group's mean is over its loss-carrying tokens
        sums, counts = group_loss_means(token_loss.detach(), counted, group_ids, num_groups)
        present = counts > 0
        means = sums / counts.clamp_min(1.0)
        if present.any():
            lo, hi = means[present].min(), means[present].max()
            self._loss_min = lo if self._loss_min is None else torch.minimum(self._loss_min, lo)
            self._loss_max = hi if self._loss_max is None else torch.maximum(self._loss_max, hi)
        if self.loss_range is None or not self.weighting_active(step):
            weights = torch.ones(num_groups, dtype=torch.float32, device=logits.device)
        else:
            weights = linupper_weights(means, *self.loss_range, self.cfg.linupper_d, self.cfg.linupper_r)
        tok_w = token_weights(labels, group_ids, weights)
        loss_sum = (token_loss * tok_w * loss_mask.float()).sum()
        normaliser = normaliser_for(self.cfg.normalize, counted, tok_w, num_contributions)
        return LossTerms(loss_sum, normaliser, token_loss.detach(), weights)

    # ----- end of step ----------------------------------------------------------------------------
    def end_step(self, all_reduce_sum: Reduce | None = None, all_reduce_max: Reduce | None = None) -> None:
        """Fold this step's statistics (reduced over data-parallel ranks) into the running state.

        Must be called on every rank that computed weights (the last pipeline stage), collectively.
        """
        identity: Reduce = lambda t: t  # noqa: E731 - single process
        reduce_sum, reduce_max = all_reduce_sum or identity, all_reduce_max or identity
        if self._standardize_running:
            partial = self._score_partials if self._score_partials is not None else torch.zeros(3, dtype=torch.float64)
            self.score_stats.update(reduce_sum(partial.clone()))
        if self.cfg.enabled and self.cfg.policy == "linupper":
            inf = torch.tensor(float("inf"))
            lo = self._loss_min.detach().cpu().float() if self._loss_min is not None else inf
            hi = self._loss_max.detach().cpu().float() if self._loss_max is not None else -inf
            reduced = reduce_max(torch.stack([-lo, hi]).double())
            if torch.isfinite(reduced).all():
                self.loss_range = (float(-reduced[0]), float(reduced[1]))
        if self._step_units:
            self._previous_units = torch.cat(self._step_units)[-self.MAX_KEPT_EMBEDDINGS:]
        self._step_units = []
        self._score_partials = self._loss_min = self._loss_max = None

    # ----- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        previous = None if self._previous_units is None else self._previous_units.cpu().clone()
        return {"anchors": self.anchors.state_dict(), "score_stats": self.score_stats.state_dict(),
                "loss_range": self.loss_range, "previous_units": previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchors.load_state_dict(state["anchors"])
        self.score_stats.load_state_dict(state["score_stats"])
        self.loss_range = None if state["loss_range"] is None else tuple(state["loss_range"])
        previous = state.get("previous_units")
        device = self.anchors.centroid.device if self.anchors.centroid is not None else "cpu"
        self._previous_units = None if previous is None else previous.to(device)
