"""`AdaptMegatron`: ADAPT inside any megatron-core training loop (the one public way in).

A user's loop keeps its GPTModel chunks, `get_forward_backward_func()`, optimizer and scheduler;
this class hands it the pieces that carry the method (docs/PLUGIN.md, "Megatron-core"):

  forward_step_func / wrap_forward_step(fn)   megatron's forward_step_func with ADAPT's loss_func
  loss_func(batch, hidden, logits)            weights from the forward's own hidden states, weighted CE sum
  finalize_model_grads                        set as config.finalize_model_grads_func: divides the
                                              gradients by the global float normaliser sum(m w)
  begin_step(step) / end_step()               per-step sums reset; step totals and the method's
                                              running state reduced over DP (broadcast over PP)
  needs_anchor_refresh / refresh_anchors      the anchor centroid from a forward-only trunk pass
  state_dict / load_state_dict                the method's checkpointable state
  step_metrics()                              the step's monitoring metrics: partial sums of this
                                              rank's groups reduced over DP, finalised
  local_groups()                              this rank's own per-group rows (document tables)
  groups()                                    test/debug aid: every group row gathered over DP

The hidden states are captured by a forward pre-hook on the last stage's `output_layer` (its input
is the final hidden state after the final norm): no second forward. Our trainer (`TrainStep`) uses
exactly this class.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from adapt_pretrain.config import AdaptConfig
from adapt_pretrain.core import AdaptEngine
from adapt_pretrain.megatron.batch import chunk_iterators, padding_micro_batch, shape_of, to_device
from adapt_pretrain.megatron.loss import StepAccumulator, TPContext, adapt_loss, group_signal_input
from adapt_pretrain.megatron.model import HiddenCapture, unwrap

if TYPE_CHECKING:
    from adapt_pretrain.monitor.stats import StepMetrics

GROUP_KEYS = ("weights", "scores", "group_domain", "group_doc_id", "group_tokens", "group_loss_sum")

# A user's model call: (batch on device, model chunk) -> the chunk's output tensor.
ModelCall = Callable[[dict[str, Any], nn.Module], torch.Tensor]


@dataclass
class StepTotals:
    """Global sums of one step (identical on every rank): loss = loss_sum / normaliser."""

    loss: float
    normaliser: float
    loss_sum: float
    num_tokens: int


def default_model_call(batch: dict[str, Any], model: nn.Module) -> torch.Tensor:
    """GPTModel(tokens, position ids, attention_mask=None): causal attention over the packed window."""
    b, s = batch["tokens"].shape
    position_ids = torch.arange(s, device=batch["tokens"].device).unsqueeze(0).expand(b, s)
    return model(batch["tokens"], position_ids, None)


class AdaptMegatron:
    """ADAPT for megatron-core model chunks; see the module docstring.

    model_chunks: this rank's chunks (megatron DDP-wrapped GPTModels, one per virtual stage) built
    with `calculate_per_token_loss=True`. adapt: the `adapt` config section (AdaptConfig, a dict of
    its keys, or an AdaptEngine). num_microbatches: micro-batches per step on this DP rank.
    sequence_parallel defaults to the model config's.
    """

    def __init__(self, model_chunks: list[nn.Module], adapt: Union[AdaptConfig, Mapping[str, Any], AdaptEngine, None],
                 num_microbatches: int, domains: Iterable[str] = ()) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core.utils import get_model_config

        if num_microbatches < 1:
            raise ValueError(f"num_microbatches={num_microbatches} must be >= 1")
        self.chunks = list(model_chunks)
        self.config = get_model_config(self.chunks[0])
        if not self.config.calculate_per_token_loss:
            raise ValueError("ADAPT needs TransformerConfig(calculate_per_token_loss=True): its loss_func returns "
                             "(loss sum, token count) and finalize_model_grads divides by the global normaliser")
        self.engine = _engine(adapt)
        self.cfg = self.engine.cfg
        self.domains = list(domains)
        self.num_microbatches = num_microbatches
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
        self.tp = TPContext(ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(),
                            ps.get_tensor_model_parallel_world_size(), bool(self.config.sequence_parallel))
        self.dp_group = ps.get_data_parallel_group()
        self.dp_size = ps.get_data_parallel_world_size()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.pp_last_rank = ps.get_pipeline_model_parallel_last_rank()
        self.is_last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.acc = StepAccumulator(self.device)
        self.capture = {id(c): HiddenCapture.attach(unwrap(c)) for c in self.chunks if unwrap(c).post_process}
        self.step_index = 0
        self._mode = "train"
        self._anchor_sums: Optional[torch.Tensor] = None
        self.forward_step_func = self.wrap_forward_step(default_model_call)

    # ----- megatron callbacks ---------------------------------------------------------------------
    def wrap_forward_step(self, model_call: ModelCall) -> Callable:
        """megatron's forward_step_func around `model_call(batch, model) -> output`: takes the next
        batch (the loader's dict: tokens, labels, loss_mask, group_id, position, num_groups, ...),
        moves it to the device, calls the model and returns (output, loss_func); loss_func is
        ADAPT's on the last stage. In anchor mode the last stage runs without its output layer, so
        its output *is* the final hidden states."""

        def forward_step(data_iterator, model: nn.Module):
            batch = to_device(next(data_iterator), self.device)
            output = model_call(batch, model)
            if id(model) not in self.capture:  # not the last stage
                return output, _unused_loss_func
            if self._mode == "anchors":
                return output, partial(self._anchor_loss_func, batch)
            return output, partial(self.loss_func, batch, self.capture[id(model)].pop())

        return forward_step

    def loss_func(self, batch: dict[str, Any], hidden: torch.Tensor, logits: torch.Tensor):
        """(sum m w l, masked tokens (int), report): the normaliser sum(m w) is kept for
        finalize_model_grads; monitoring rows for groups()."""
        return adapt_loss(self.engine, self.step_index, batch, logits, hidden, self.tp,
                          self.num_microbatches * self.dp_size, self.acc)

    def finalize_model_grads(self, model: list[nn.Module], num_tokens: Optional[torch.Tensor] = None, **kwargs):
        """config.finalize_model_grads_func: megatron's finalize (DP / embedding all-reduces)
        without its int32 token normaliser, then grads / global sum(m w) (float). The step sums
        are broadcast from the last stage over PP and all-reduced over DP. For integral
        normalisers (ADAPT off) this is megatron's own float32 `1.0 / total` scaling."""
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

    # ----- the step -------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Before forward_backward_func: the step index ADAPT is at, fresh per-step sums."""
        self.step_index = step
        self._mode = "train"
        self.acc.reset()

    def totals(self) -> StepTotals:
        """The step's global sums (after forward_backward_func, which ran finalize_model_grads)."""
        normaliser, loss_sum, tokens = self.acc.totals.tolist()
        loss = loss_sum / normaliser if normaliser > 0 else float("nan")
        return StepTotals(loss=loss, normaliser=normaliser, loss_sum=loss_sum, num_tokens=int(round(tokens)))

    def end_step(self) -> StepTotals:
        """After the optimizer step: fold this step into the method's running state (reduced over
        DP, broadcast over PP: identical on every rank); returns the step's global sums."""
        self.engine.end_step(self._reduce_sum, self._reduce_max)
        return self.totals()

    # ----- anchors --------------------------------------------------------------------------------
    @property
    def needs_anchors(self) -> bool:
        """Whether this configuration uses anchor batches at all (the model's own embeddings)."""
        return bool(self.cfg.enabled and self.cfg.policy == "adapt" and self.cfg.signal == "embed")

    def needs_anchor_refresh(self, step: int) -> bool:
        """Same answer on every rank (the centroid is kept identical everywhere)."""
        return self.engine.needs_anchor_refresh(step)

    @torch.no_grad()
    def refresh_anchors(self, step: int, anchor_micro_batches: list[dict[str, Any]],
                        forward_backward_func: Callable) -> dict[str, float]:
        """Encode this DP rank's share of the anchors with a forward-only pass of the trunk (no
        output layer, no logits) through `forward_backward_func`, and set the centroid from sums
        all-reduced over DP (then broadcast over PP): identical on every rank.

        Every PP/TP rank of a DP replica must pass the same list; DP ranks may hold different
        numbers of anchor micro-batches (even none). Returns the refresh event's fields (for
        `Monitor.log_event(step, "anchor_refresh", **fields)`).
        """
        start = time.perf_counter()
        batches = list(anchor_micro_batches)
        self._anchor_sums = None
        if batches:
            b, s = shape_of(batches)
            if len(self.chunks) > 1:  # interleaved: whole rounds of pipeline-size micro-batches
                batches += [padding_micro_batch(batches[0])] * ((-len(batches)) % self.pp_size)
            self._mode = "anchors"
            try:
                for chunk in self.chunks:
                    chunk.eval()
                with _trunk_only(self.chunks):
                    forward_backward_func(forward_step_func=self.forward_step_func,
                                          data_iterator=chunk_iterators(batches, len(self.chunks)),
                                          model=self.chunks, num_microbatches=len(batches), seq_length=s,
                                          micro_batch_size=b, forward_only=True)
            finally:
                self._mode = "train"
                for chunk in self.chunks:
                    chunk.train()
        hidden_size = self.config.hidden_size
        sums = self._anchor_sums
        if sums is None or not self.is_last_stage:
            sums = torch.zeros(hidden_size + 1, dtype=torch.float64, device=self.device)
        if self.dp_size > 1:
            dist.all_reduce(sums, group=self.dp_group)
        if self.pp_size > 1:
            dist.broadcast(sums, src=self.pp_last_rank, group=self.pp_group)
        self._anchor_sums = None
        event = self.engine.finish_anchor_refresh(sums[:hidden_size].float(), sums[hidden_size].float(), step,
                                                  all_reduce_sum=self._reduce_sum)
        event.pop("step", None)  # the caller logs it at its own step
        event["refresh_time_s"] = time.perf_counter() - start
        return event

    def _anchor_loss_func(self, batch: dict[str, Any], hidden: torch.Tensor):
        h, gid, pos = group_signal_input(self.engine, hidden, batch, self.tp)
        unit_sum, count = self.engine.anchor_partial(h, gid, pos, batch["num_groups"])
        part = torch.cat([unit_sum.double(), count.double().reshape(1)])
        self._anchor_sums = part if self._anchor_sums is None else self._anchor_sums + part
        return hidden.new_zeros(()), torch.tensor(0, dtype=torch.int), {}

    # ----- state and monitoring -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The method's state (centroid, running statistics): identical on every rank."""
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)

    def step_metrics(self, rows: Optional[dict[str, torch.Tensor]] = None) -> Optional["StepMetrics"]:
        """This step's monitoring metrics on last-stage ranks (None elsewhere): an
        `adapt_pretrain.monitor.StepMetrics` (`.scalars`: `adapt/weight_*`, `adapt/ess`,
        `domain/<name>/...`, `loss/*`; `.histograms`: `hist/weights`, `hist/scores`).

        The one monitoring route (docs/MONITORING.md): partial sums of this rank's own group rows,
        reduced over DP (sum + max), finalised; identical on every last-stage rank and equal to the
        metrics of the whole global batch. Collective over DP on the last stage: every last-stage
        rank calls it every step, or none does. Cost: one small all-reduce pair, whatever the batch.
        rows: this rank's `local_groups()` when the caller already holds them (not built twice).
        """
        if not self.is_last_stage:
            return None
        from adapt_pretrain.monitor import empty_stats, finalize, partial_stats

        layout = self.stats_layout()
        rows = self.local_groups(device=self.device) if rows is None else rows
        if rows and "weights" in rows:
            domain = rows.get("group_domain")
            if domain is None:  # no domain labels: the groups count in the global metrics only
                domain = torch.full_like(rows["weights"], -1, dtype=torch.long)
            part = partial_stats(layout, rows["weights"], rows["scores"], rows["group_tokens"], domain,
                                 rows["group_loss_sum"])
        else:
            part = empty_stats(layout, self.device)
        if self.dp_size > 1:
            part = part.all_reduce(self.dp_group)
        return finalize(part, self.domains or None)

    def local_groups(self, device: Union[torch.device, str] = "cpu") -> Optional[dict[str, torch.Tensor]]:
        """This rank's own per-group rows of the step (weights, scores, group_domain, group_doc_id,
        group_tokens, group_loss_sum; micro-batches concatenated in order) on last-stage ranks,
        None elsewhere. No communication: for tables of this rank's documents (whose tokens it holds)."""
        if not self.is_last_stage:
            return None
        rows = self.acc.groups
        keys = [k for k in GROUP_KEYS if rows and all(k in r for r in rows)]
        return {k: torch.cat([r[k].to(device) for r in rows]) for k in keys}

    def groups(self) -> Optional[dict[str, torch.Tensor]]:
        """Test/debug aid, not for monitoring (use `step_metrics`): the per-group rows of the whole
        global batch, gathered over DP (DP rank order), on last-stage ranks; None elsewhere.
        Collective over DP on the last stage. Its cost grows with the global batch.

        One padded all-gather of all fields packed as float64 (exact for the int64 ids/domains
        below 2^53 and the fp32 values), plus one for the row counts.
        """
        if not self.is_last_stage:
            return None
        local = self.local_groups(device=self.device)
        if self.dp_size == 1:
            return {k: v.cpu() for k, v in local.items()}
        keys = list(local)
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

    def stats_layout(self) -> Any:
        from adapt_pretrain.monitor import StatsLayout

        return StatsLayout.for_adapt(self.cfg, len(self.domains))

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


def _engine(adapt: Union[AdaptConfig, Mapping[str, Any], AdaptEngine, None]) -> AdaptEngine:
    if isinstance(adapt, AdaptEngine):
        return adapt
    if adapt is None:
        return AdaptEngine(AdaptConfig(enabled=False))
    if isinstance(adapt, AdaptConfig):
        return AdaptEngine(adapt)
    if isinstance(adapt, Mapping):
        return AdaptEngine(AdaptConfig.from_dict(adapt))
    raise TypeError(f"adapt must be an AdaptConfig, a dict of its keys or an AdaptEngine, not {type(adapt).__name__}")


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
