"""`TrainStep`: one optimiser step of a megatron-core GPT with ADAPT inside the pipeline schedule.

Flow of one step (DESIGN 2):
  1. megatron's forward_backward_func (no-pipelining, 1F1B or interleaved) runs every micro-batch;
     on the last stage `forward_step` returns a loss_func bound to this micro-batch's final hidden
     states (captured at the output layer's input: no second forward) and logits;
  2. loss_func scores/weights the token groups and returns (sum m w l, masked tokens, report);
     its float normaliser (sum m w) is accumulated on the side;
  3. megatron calls our finalize hook at the end of the schedule: grads are all-reduced over DP by
     megatron's finalize_model_grads, then the step totals (normaliser, loss sum, tokens) are
     broadcast from the last stage over PP and all-reduced over DP, and grads are divided by the
     global normaliser. (Megatron's own per-token path accumulates the normaliser in an int32
     tensor, which cannot carry sum(m w); for integral normalisers - ADAPT off - our hook performs
     the identical float32 `1.0 / total` scaling, so plain training is bit-identical.)
  4. non-finite global loss -> no update (the decision is identical on every rank); otherwise the
     megatron optimizer steps (clip, AdamW) and the LR scheduler advances;
  5. engine.end_step with reductions over DP (then broadcast over PP, so every rank's engine state
     is identical and any rank's checkpoint is complete).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from adapt_pretrain.config import AdaptConfig
from adapt_pretrain.core import AdaptEngine
from adapt_pretrain.megatron.batch import chunk_iterators, padding_micro_batch, shape_of, to_device
from adapt_pretrain.megatron.config import ModelConfig, ParallelConfig
from adapt_pretrain.megatron.loss import StepAccumulator, TPContext, adapt_loss, group_signal_input
from adapt_pretrain.megatron.model import HiddenCapture, unwrap
from adapt_pretrain.megatron.optim import current_lr, load_optimizer_state_dict, optimizer_state_dict

GROUP_KEYS = ("weights", "scores", "group_domain", "group_doc_id", "group_tokens", "group_loss_sum")


@dataclass
class StepResult:
    """Outcome of one step, identical on every rank except `groups` (last stage only).

    loss: global sum(m w l) / global normaliser; grad_norm: before clipping (nan when skipped);
    lr: the learning rate this update used; num_tokens: global masked tokens; normaliser: global
    sum of loss_func normalisers; groups: per-group rows of the whole global batch (gathered over
    DP) on last-stage ranks, None elsewhere.
    """

    loss: float
    grad_norm: float
    lr: float
    skipped: bool
    num_tokens: int
    normaliser: float
    groups: Optional[dict[str, torch.Tensor]]
    step_time_s: float = 0.0


class TrainStep:
    """Runs one training step of `model_chunks` with ADAPT; see module docstring.

    engine=None means plain training (an AdaptEngine with enabled=False: the very same code path).
    gather_groups=False skips the per-group DP gather used only for monitoring.
    """

    def __init__(self, model_chunks: list[nn.Module], optimizer: Any, scheduler: Any,
                 engine: Optional[AdaptEngine], model_cfg: ModelConfig, parallel_cfg: ParallelConfig,
                 num_microbatches: int, gather_groups: bool = True) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func
        from megatron.core.utils import get_model_config

        if num_microbatches < 1:
            raise ValueError(f"num_microbatches={num_microbatches} must be >= 1")
        if parallel_cfg.interleaved and num_microbatches % parallel_cfg.pipeline:
            raise ValueError(f"interleaved pipeline needs num_microbatches ({num_microbatches}) divisible by "
                             f"parallel.pipeline ({parallel_cfg.pipeline})")
        self.chunks = model_chunks
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.engine = engine if engine is not None else AdaptEngine(AdaptConfig(enabled=False))
        self.model_cfg = model_cfg
        self.parallel_cfg = parallel_cfg
        self.num_microbatches = num_microbatches
        self.gather_groups = gather_groups
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.tp = TPContext(ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(),
                            ps.get_tensor_model_parallel_world_size(), parallel_cfg.sequence_parallel)
        self.dp_group = ps.get_data_parallel_group()
        self.dp_size = ps.get_data_parallel_world_size()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.pp_last_rank = ps.get_pipeline_model_parallel_last_rank()
        self.is_last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.forward_backward = get_forward_backward_func()
        self.acc = StepAccumulator(self.device)
        self.capture = {id(c): HiddenCapture.attach(unwrap(c)) for c in model_chunks if unwrap(c).post_process}
        self._step = 0
        self._mode = "train"
        self._anchor_sums: Optional[torch.Tensor] = None

        config = get_model_config(model_chunks[0])
        if not config.calculate_per_token_loss:
            raise ValueError("model chunks must come from build_model (calculate_per_token_loss=True)")
        self.config = config
        config.finalize_model_grads_func = self._finalize_model_grads
        config.grad_scale_func = None
        config.no_sync_func = [c.no_sync for c in model_chunks] if len(model_chunks) > 1 else model_chunks[0].no_sync

    # ----- megatron callbacks ---------------------------------------------------------------------
    def _forward_step(self, data_iterator, model: nn.Module):
        """megatron forward_step_func: returns (output, loss_func); loss_func only on the last stage.

        In anchor mode the last-stage chunk runs without its output layer (`_trunk_only`), so its
        output *is* the final hidden states."""
        batch = next(data_iterator)
        b, s = batch["tokens"].shape
        position_ids = torch.arange(s, device=self.device).unsqueeze(0).expand(b, s)
        output = model(batch["tokens"], position_ids, None)
        if id(model) not in self.capture:  # not the last stage
            return output, _unused_loss_func
        if self._mode == "anchors":
            return output, partial(self._anchor_loss_func, batch)
        hidden = self.capture[id(model)].pop()
        return output, partial(self._train_loss_func, batch, hidden)

    def _train_loss_func(self, batch: dict[str, Any], hidden: torch.Tensor, logits: torch.Tensor):
        return adapt_loss(self.engine, self._step, batch, logits, hidden, self.tp,
                          self.num_microbatches * self.dp_size, self.acc)

    def _anchor_loss_func(self, batch: dict[str, Any], hidden: torch.Tensor):
        h, gid, pos = group_signal_input(self.engine, hidden, batch, self.tp)
        unit_sum, count = self.engine.anchor_partial(h, gid, pos, batch["num_groups"])
        part = torch.cat([unit_sum.double(), count.double().reshape(1)])
        self._anchor_sums = part if self._anchor_sums is None else self._anchor_sums + part
        zero = hidden.new_zeros(())
        return zero, torch.tensor(0, dtype=torch.int), {}

    def _finalize_model_grads(self, model: list[nn.Module], num_tokens: Optional[torch.Tensor] = None, **kwargs):
        """Megatron's finalize (DP/embedding grad all-reduce) without its int normaliser, then
        divide grads by the global float normaliser (see module docstring, step 3)."""
        from megatron.core.distributed import finalize_model_grads

        finalize_model_grads(model, None, **kwargs)
        totals = self.acc.totals
        if self.pp_size > 1:
            dist.broadcast(totals, src=self.pp_last_rank, group=self.pp_group)
        if self.dp_size > 1:
            dist.all_reduce(totals, group=self.dp_group)
        normaliser = totals[0].float()
        if normaliser > 0:
            scaling = 1.0 / normaliser
            for chunk in model:
                chunk.scale_gradients(scaling)

    # ----- public API -----------------------------------------------------------------------------
    def __call__(self, step: int, micro_batches: list[dict[str, Any]]) -> StepResult:
        """One optimiser step on this DP rank's `num_microbatches` micro-batches."""
        if len(micro_batches) != self.num_microbatches:
            raise ValueError(f"got {len(micro_batches)} micro-batches, expected num_microbatches={self.num_microbatches}")
        start = time.perf_counter()
        batches = [to_device(mb, self.device) for mb in micro_batches]
        b, s = shape_of(batches)
        self._step, self._mode = step, "train"
        self.acc.reset()
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.forward_backward(
            forward_step_func=self._forward_step,
            data_iterator=chunk_iterators(batches, len(self.chunks)),
            model=self.chunks,
            num_microbatches=self.num_microbatches,
            seq_length=s,
            micro_batch_size=b,
            forward_only=False,
        )
        totals = self.acc.totals.tolist()
        normaliser, loss_sum, tokens = totals
        loss = loss_sum / normaliser if normaliser > 0 else float("nan")
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
        self.engine.end_step(self._reduce_sum, self._reduce_max)
        groups = self._gather_groups() if self.is_last_stage and self.gather_groups else None
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, skipped=skipped, num_tokens=int(round(tokens)),
                          normaliser=normaliser, groups=groups, step_time_s=time.perf_counter() - start)

    def needs_anchor_refresh(self, step: int) -> bool:
        """Same answer on every rank (the centroid is kept identical everywhere)."""
        return self.engine.needs_anchor_refresh(step)

    @torch.no_grad()
    def refresh_anchors(self, step: int, anchor_micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        """Encode this DP rank's share of the anchors with a forward-only pipeline pass of the
        trunk (no output layer, no logits: only the final hidden states are used) and set the
        centroid from sums all-reduced over DP (then broadcast over PP): identical on every rank.

        Every PP/TP rank of a DP replica must pass the same list; DP ranks may hold different
        numbers of anchor micro-batches (even none).
        """
        start = time.perf_counter()
        batches = [to_device(mb, self.device) for mb in anchor_micro_batches]
        self._anchor_sums = None
        if batches:
            b, s = shape_of(batches)
            if self.parallel_cfg.interleaved:
                pp = self.parallel_cfg.pipeline
                batches += [padding_micro_batch(batches[0])] * ((-len(batches)) % pp)
            self._mode = "anchors"
            try:
                for chunk in self.chunks:
                    chunk.eval()
                with _trunk_only(self.chunks):
                    self.forward_backward(
                        forward_step_func=self._forward_step,
                        data_iterator=chunk_iterators(batches, len(self.chunks)),
                        model=self.chunks,
                        num_microbatches=len(batches),
                        seq_length=s,
                        micro_batch_size=b,
                        forward_only=True,
                    )
            finally:
                self._mode = "train"
                for chunk in self.chunks:
                    chunk.train()
        hidden_size = self.model_cfg.hidden_size
        sums = self._anchor_sums if self._anchor_sums is not None else \
            torch.zeros(hidden_size + 1, dtype=torch.float64, device=self.device)
        if not self.is_last_stage:
            sums = torch.zeros(hidden_size + 1, dtype=torch.float64, device=self.device)
        if self.dp_size > 1:
            dist.all_reduce(sums, group=self.dp_group)
        if self.pp_size > 1:
            dist.broadcast(sums, src=self.pp_last_rank, group=self.pp_group)
        self._anchor_sums = None
        event = self.engine.finish_anchor_refresh(sums[:hidden_size].float(), sums[hidden_size].float(), step,
                                                  all_reduce_sum=self._reduce_sum)
        event["refresh_time_s"] = time.perf_counter() - start
        return event

    def state_dict(self) -> dict[str, Any]:
        """This rank's model chunks, optimizer (incl. the distributed optimizer's shard), scheduler and
        engine; for a resume with the same layout. Tensors may alias live state: save (or deep-copy)
        before the next step."""
        for chunk in self.chunks:
            if chunk.ddp_config.overlap_param_gather:
                # the updated parameters' all-gather normally overlaps with the next forward: finish it
                chunk.start_param_sync(force_sync=True)
        state: dict[str, Any] = {
            "model": [unwrap(c).state_dict() for c in self.chunks],
            "optimizer": optimizer_state_dict(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "engine": self.engine.state_dict(),
        }
        return state

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
        self.engine.load_state_dict(state["engine"])

    # ----- helpers --------------------------------------------------------------------------------
    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def _reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def _reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        """Reduce over DP on the last stage, then broadcast over PP so every rank holds the result."""
        out = tensor.detach().to(self.device).clone()
        if self.dp_size > 1:
            dist.all_reduce(out, op=op, group=self.dp_group)
        if self.pp_size > 1:
            dist.broadcast(out, src=self.pp_last_rank, group=self.pp_group)
        return out.to(tensor.device)

    def _gather_groups(self) -> dict[str, torch.Tensor]:
        """Concatenate this rank's per-micro-batch group rows, then all-gather them over DP.

        One padded all-gather of all fields packed as float64 (exact for the int64 ids/domains
        below 2^53 and the fp32 values), plus one for the row counts.
        """
        rows = self.acc.groups
        keys = [k for k in GROUP_KEYS if rows and all(k in r for r in rows)]
        local = {k: torch.cat([r[k].to(self.device) for r in rows]) for k in keys}
        if self.dp_size == 1:
            return {k: v.cpu() for k, v in local.items()}
        dtypes = {k: v.dtype for k, v in local.items()}
        n = next(iter(local.values())).numel() if local else 0
        counts = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.dp_size)]
        dist.all_gather(counts, torch.tensor([n], device=self.device), group=self.dp_group)
        sizes = [int(c) for c in counts]
        packed = torch.zeros(len(keys), max(sizes), dtype=torch.float64, device=self.device)
        for i, key in enumerate(keys):
            packed[i, :n] = local[key].double()
        gathered = [torch.empty_like(packed) for _ in range(self.dp_size)]
        dist.all_gather(gathered, packed, group=self.dp_group)
        full = torch.cat([g[:, :size] for g, size in zip(gathered, sizes)], dim=1)
        return {key: full[i].to(dtypes[key]).cpu() for i, key in enumerate(keys)}


@contextlib.contextmanager
def _trunk_only(chunks: list[nn.Module]):
    """Run the last-stage GPTModel without its output layer: megatron's GPTModel returns the
    decoder output (after the final norm, i.e. exactly what HiddenCapture sees) when
    `post_process` is False at call time; the flag is restored afterwards."""
    gpts = [unwrap(c) for c in chunks if unwrap(c).post_process]
    for gpt in gpts:
        gpt.post_process = False
    try:
        yield
    finally:
        for gpt in gpts:
            gpt.post_process = True


def _unused_loss_func(output: torch.Tensor):  # pragma: no cover - megatron only calls it on the last stage
    raise RuntimeError("loss_func called on a non-last pipeline stage")
