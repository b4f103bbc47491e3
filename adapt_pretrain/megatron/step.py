"""`TrainStep`: one optimiser step of a megatron-core GPT with ADAPT inside the pipeline schedule.

The trainer's own megatron-core loop; ADAPT enters only through `AdaptMegatron` (plugin.py), the
surface any user loop takes (docs/PLUGIN.md).

Flow of one step (docs/PARALLELISM.md):
  1. megatron's forward_backward_func (no-pipelining, 1F1B or interleaved) runs every micro-batch;
     on the last stage `forward_step` returns a loss_func bound to this micro-batch's final hidden
     states (captured at the output layer's input: no second forward) and logits;
  2. loss_func scores/weights the token groups and returns (sum m w l, masked tokens, report);
     its float normaliser (sum m w) is accumulated on the side;
  3. megatron calls AdaptMegatron.finalize_model_grads at the end of the schedule: grads are all-reduced over DP by
     megatron's finalize_model_grads, then the step totals (normaliser, loss sum, tokens) are
     broadcast from the last stage over PP and all-reduced over DP, and grads are divided by the
     global normaliser. (Megatron's own per-token path accumulates the normaliser in an int32
     tensor, which cannot carry sum(m w); for integral normalisers - ADAPT off - our hook performs
     the identical float32 `1.0 / total` scaling, so plain training is bit-identical.)
  4. non-finite global loss -> no update (the decision is identical on every rank); otherwise the
     megatron optimizer steps (clip, AdamW) and the LR scheduler advances;
  5. AdaptMegatron.end_step: engine.end_step with reductions over DP (then broadcast over PP, so every rank's engine state
     is identical and any rank's checkpoint is complete).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch
from torch import nn

from adapt_pretrain.core import AdaptEngine
from adapt_pretrain.megatron.batch import chunk_iterators, shape_of
from adapt_pretrain.megatron.config import ModelConfig, ParallelConfig
from adapt_pretrain.megatron.model import unwrap
from adapt_pretrain.megatron.optim import current_lr, load_optimizer_state_dict, optimizer_state_dict
from adapt_pretrain.megatron.plugin import AdaptMegatron

if TYPE_CHECKING:
    from adapt_pretrain.monitor.stats import StepMetrics


@dataclass
class StepResult:
    """Outcome of one step, identical on every rank except the last three fields.

    loss: global sum(m w l) / global normaliser; grad_norm: before clipping (nan when skipped);
    lr: the learning rate this update used; num_tokens: global masked tokens; normaliser: global
    sum of loss_func normalisers.
    metrics: the step's monitoring metrics (`StepMetrics`: `.scalars`, `.histograms`) of the whole
    global batch, reduced over DP from partial sums (`AdaptMegatron.step_metrics`); identical on
    every last-stage rank, None elsewhere.
    local_groups: this rank's own per-group rows (`AdaptMegatron.local_groups`: weights, scores,
    group_domain, group_doc_id, group_tokens, group_loss_sum) on last-stage ranks, None elsewhere;
    on the step's device (no copy every step), for tables of documents whose tokens this rank holds.
    groups: every group row of the global batch gathered over DP, only with
    `TrainStep(gather_groups=True)` (a test/debug aid), else None.
    """

    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    num_tokens: int
    normaliser: float
    metrics: Optional["StepMetrics"] = None
    local_groups: Optional[dict[str, torch.Tensor]] = None
    groups: Optional[dict[str, torch.Tensor]] = None


class TrainStep:
    """One optimiser step of `model_chunks` with ADAPT: our trainer's plain megatron-core loop
    around `AdaptMegatron`, the public surface (no other way in); see the module docstring.

    engine=None means plain training (an AdaptEngine with enabled=False: the very same code path).
    Every step's result carries the monitoring metrics (reduced partial sums, cheap at any scale).
    gather_groups=True additionally all-gathers every group row of the global batch into
    `StepResult.groups`: a test/debug aid (the layout tests compare each group's weight with an
    independent reference); its cost grows with the global batch, so training leaves it off.
    """

    def __init__(self, model_chunks: list[nn.Module], optimizer: Any, scheduler: Any,
                 engine: Optional[AdaptEngine], model_cfg: ModelConfig, parallel_cfg: ParallelConfig,
                 num_microbatches: int, gather_groups: bool = False, domains: Iterable[str] = ()) -> None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if num_microbatches < 1:
            raise ValueError(f"num_microbatches={num_microbatches} must be >= 1")
        if parallel_cfg.interleaved and num_microbatches % parallel_cfg.pipeline:
            raise ValueError(f"interleaved pipeline needs num_microbatches ({num_microbatches}) divisible by "
                             f"parallel.pipeline ({parallel_cfg.pipeline})")
        self.chunks = model_chunks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.adapt = AdaptMegatron(model_chunks, engine, num_microbatches, domains=domains)
        self.model_cfg = model_cfg
        self.parallel_cfg = parallel_cfg
        self.num_microbatches = num_microbatches
        self.gather_groups = gather_groups
        self.forward_backward = get_forward_backward_func()
        config = self.adapt.config
        config.finalize_model_grads_func = self.adapt.finalize_model_grads
        config.grad_scale_func = None
        config.no_sync_func = [c.no_sync for c in model_chunks] if len(model_chunks) > 1 else model_chunks[0].no_sync

    @property
    def engine(self) -> AdaptEngine:
        return self.adapt.engine

    @engine.setter
    def engine(self, engine: AdaptEngine) -> None:  # the benchmark swaps ADAPT on/off on one model
        self.adapt.engine, self.adapt.cfg = engine, engine.cfg

    def __call__(self, step: int, micro_batches: list[dict[str, Any]]) -> StepResult:
        """One optimiser step on this DP rank's `num_microbatches` micro-batches."""
        if len(micro_batches) != self.num_microbatches:
            raise ValueError(f"got {len(micro_batches)} micro-batches, expected num_microbatches={self.num_microbatches}")
        b, s = shape_of(micro_batches)
        self.adapt.begin_step(step)
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.forward_backward(
            forward_step_func=self.adapt.forward_step_func,
            data_iterator=chunk_iterators(micro_batches, len(self.chunks)),
            model=self.chunks,
            num_microbatches=self.num_microbatches,
            seq_length=s,
            micro_batch_size=b,
            forward_only=False,
        )
        loss = self.adapt.totals().loss
        lr = current_lr(self.optimizer)
        skipped = not math.isfinite(loss)
        grad_norm = float("nan")
        if not skipped:
            update_ok, grad_norm, _ = self.optimizer.step()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if update_ok:
                self.scheduler.step(increment=1)
            else:
                skipped = True
        totals = self.adapt.end_step()
        rows = self.adapt.local_groups(device=self.adapt.device)  # on the device: no copy unless a table reads them
        metrics = self.adapt.step_metrics(rows)
        groups = self.adapt.groups() if self.gather_groups else None
        return StepResult(loss=totals.loss, grad_norm=grad_norm, lr=lr, skipped=skipped, num_tokens=totals.num_tokens,
                          normaliser=totals.normaliser, metrics=metrics, local_groups=rows, groups=groups)

    def needs_anchor_refresh(self, step: int) -> bool:
        """Same answer on every rank (the centroid is kept identical everywhere)."""
        return self.adapt.needs_anchor_refresh(step)

    def refresh_anchors(self, step: int, anchor_micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        """`AdaptMegatron.refresh_anchors` through this step's schedule."""
        return self.adapt.refresh_anchors(step, anchor_micro_batches, self.forward_backward)

    def state_dict(self) -> dict[str, Any]:
        """This rank's model chunks, optimizer (incl. the distributed optimizer's shard), scheduler and
        ADAPT state; for a resume with the same layout. Tensors may alias live state: save (or deep-copy)
        before the next step."""
        for chunk in self.chunks:
            if chunk.ddp_config.overlap_param_gather:
                # the updated parameters' all-gather normally overlaps with the next forward: finish it
                chunk.start_param_sync(force_sync=True)
        return {
            "model": [unwrap(c).state_dict() for c in self.chunks],
            "optimizer": optimizer_state_dict(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "engine": self.adapt.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["model"]) != len(self.chunks):
            raise ValueError(f"checkpoint has {len(state['model'])} model chunks, this layout {len(self.chunks)}")
        for chunk, chunk_state in zip(self.chunks, state["model"]):
            unwrap(chunk).load_state_dict(chunk_state)
        load_optimizer_state_dict(self.optimizer, state["optimizer"])
        # megatron's scheduler *adds* the saved step count (step(increment=num_steps)): start from 0
        # so loading into a scheduler that has already stepped (in-process rollback) is exact too.
        self.scheduler.num_steps = 0
        self.scheduler.load_state_dict(state["scheduler"])
        self.adapt.load_state_dict(state["engine"])
