"""ADAPT inside a user's own DeepSpeed loop around a Hugging Face causal LM (ZeRO stage 0-3).

The user keeps their loop and swaps two calls (`engine.backward` -> `adapt.backward`,
`engine.step` -> `adapt.step`) and adds one (`adapt.loss`):

    adapt = DeepSpeedAdapt(engine, config["adapt"], domains=stream.domains)
    while ...:
        if adapt.needs_anchor_refresh():
            adapt.refresh_anchors(anchor_micro_batches)
        batch = next(micro_batches)                                  # one micro-batch of this rank
        logits = engine(input_ids=batch["tokens"]).logits             # lm_head's input is captured
        adapt.backward(adapt.loss(batch, logits))
        result = adapt.step()                                         # a StepResult at the boundary
        if result is not None:
            adapt.log(monitor, result)

Global normaliser. ADAPT's loss is sum(m w l) / sum(m w) over the *global* batch (every
accumulation micro-step of every data-parallel rank), as in the megatron path. With ADAPT on, each
micro-batch backpropagates its weighted loss *sum* (`scale_wrt_gas=False`); DeepSpeed accumulates
the gradients over the micro-steps and averages them over the DP ranks, so at the accumulation
boundary they hold sum / world. The normaliser partials (one per micro-batch, from the training
forward itself) are all-reduced into S, and `engine.step()` runs with the gradients divided by
S / world (`_GradientDivisor`): no second forward, and the update, the clipping and the reported
grad norm are those of the exactly normalised global gradient.

With ADAPT off (`adapt.enabled: false`) nothing is changed: the loss is the micro-batch's masked
mean cross-entropy, `backward` and `step` are DeepSpeed's own, i.e. plain DeepSpeed training.

Monitoring (`metrics`, `log`) uses the megatron trainer's keys where the meaning is the same:
`loss`, `lr`, `grad_norm`, `train/step_time_s`, the throughput of `adapt_pretrain.flops.throughput_metrics`
(`train/tokens_per_s` = global batch x seq_len / step time; `train/tflops_per_device` and, on a
known GPU, `train/mfu` when the model's config gives its shape: `flops.shape_from_hf_config`),
the cumulative `train/skipped_steps`, `train/tokens` (loss-carrying tokens) and
`train/consumed_samples`, and the weight statistics (`adapt/*`, `domain/<name>/*`). Its own key:
`adapt/normaliser`, the step's global normaliser S.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from adapt_pretrain.config import AdaptConfig, ConfigError
from adapt_pretrain.core import AdaptEngine, LossTerms, group_loss_means, plain_token_loss
from adapt_pretrain.core.capture import InputCapture
from adapt_pretrain.flops import ModelShape, current_device_name, shape_from_hf_config, throughput_metrics
from adapt_pretrain.logs import get_logger

log = get_logger(__name__)

BATCH_KEYS = ("tokens", "labels", "loss_mask", "group_id", "position", "num_groups")
STATIC_SCORE_KEYS = {"bm25": ("group_bm25",), "embed-static": ("group_static_score", "group_bm25")}


@dataclass
class StepResult:
    """One optimiser step, identical on every rank.

    loss: global sum(m w l) / S with ADAPT on, global masked-token mean with it off;
    normaliser: S (ADAPT on) or the global masked-token count (off); num_tokens: the global batch's
    loss-carrying tokens; num_samples, seq_len: its sequences and their length (the model processes
    num_samples x seq_len positions); grad_norm: DeepSpeed's global norm (before clipping) of the
    gradient the update used, nan when it does not report one; skipped: DeepSpeed did not apply the
    update (overflow / non-finite gradient); step_time_s: from the step's first training forward to
    the end of the update; consumed_samples, consumed_tokens, skipped_steps: the adapter's running
    totals after this step; stats: the step's weight statistics summed over DP
    (`adapt_pretrain.monitor.PartialStats`).
    """

    step: int
    loss: float
    normaliser: float
    num_tokens: int
    num_samples: int
    seq_len: int
    grad_norm: float
    lr: float
    skipped: bool
    step_time_s: float
    consumed_samples: int
    consumed_tokens: int
    skipped_steps: int
    stats: Any


class _GradientDivisor:
    """Divides the accumulated gradients by `divisor` for one `engine.step()`.

    ZeRO stage 1-3 optimizers divide their fp32 gradient partitions by their loss scale inside
    step(), before the norm is used for clipping and before the update, and report the norm divided
    by it: raising that scale to `backward_scale * divisor` (what their `override_loss_scale` sets)
    for this one step normalises exactly (the scale is restored afterwards, so backward is untouched).
    Without ZeRO and with a plain torch optimizer (fp32), the gradients are whole and replicated in
    `param.grad` and DeepSpeed clips them inside step(), so they are divided in place before it.
    Other wrappers (bf16 without ZeRO, BF16_Optimizer, fp16) are refused at construction.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.optimizer = engine.optimizer
        stage = engine.zero_optimization_stage()
        if engine.fp16_enabled():
            raise ConfigError("ADAPT's global normaliser is not tested with fp16 dynamic loss scaling; "
                              "use bf16 (ZeRO stage 1-3) or fp32")
        self.uses_loss_scale = stage > 0 and _is_zero_optimizer(self.optimizer)
        if not self.uses_loss_scale and not (stage == 0 and isinstance(self.optimizer, torch.optim.Optimizer)):
            raise ConfigError(
                f"ADAPT's global normaliser is supported for ZeRO stage 1-3 (fp32 or bf16) and for stage 0 with fp32 "
                f"and a torch optimizer; this engine (stage {stage}) wraps its optimizer in "
                f"{type(self.optimizer).__name__}. Use ZeRO stage >= 1 (and no data_types.grad_accum_dtype=fp32 "
                "override at stage 1), or fp32 at stage 0.")

    def step(self, divisor: float) -> Optional[float]:
        """engine.step() on gradients divided by `divisor`; returns the global grad norm (before
        clipping) where DeepSpeed does not report one (stage 0: replicated grads, no collective)."""
        if self.uses_loss_scale:
            opt = self.optimizer
            saved = (opt.custom_loss_scaler, opt.external_loss_scale)
            opt.custom_loss_scaler, opt.external_loss_scale = True, float(opt.loss_scale) * divisor
            try:
                self.engine.step()
            finally:
                opt.custom_loss_scaler, opt.external_loss_scale = saved
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        with torch.no_grad():
            torch._foreach_div_(grads, divisor)
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        self.engine.step()
        return norm


def _is_zero_optimizer(optimizer: Any) -> bool:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return isinstance(optimizer, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3))


class DeepSpeedAdapt:
    """ADAPT for a `deepspeed.initialize` engine around a causal LM with an `lm_head`-style output layer.

    engine: the DeepSpeed engine (pure data parallelism, ZeRO stage 0-3, any gradient accumulation).
    adapt: the `adapt` config section (an AdaptConfig or its mapping; None = off).
    domains: domain names of the data (the manifest's, `DataStream.domains`) for per-domain metrics.
    head: the module whose input is the final hidden state; default `get_output_embeddings()`.
    Batches are the data stream's micro-batches (tensors on the engine's device).
    """

    def __init__(self, engine: Any, adapt: AdaptConfig | Mapping[str, Any] | None = None,
                 domains: Sequence[str] = (), head: Optional[nn.Module] = None) -> None:
        self.cfg = adapt if isinstance(adapt, AdaptConfig) else AdaptConfig.from_dict(adapt)
        self.core = AdaptEngine(self.cfg)
        self.engine = engine
        if getattr(engine, "sequence_parallel_size", 1) != 1:
            raise ConfigError("the DeepSpeed ADAPT path supports data parallelism (ZeRO) only, not sequence parallelism")
        self.group = engine.data_parallel_group
        self.world = int(engine.dp_world_size)
        # what DeepSpeed divides the summed gradients by: the DP size ("gradient_allreduce_op": "mean",
        # the default) or 1 ("sum")
        self._reduce_divisor = self.world if getattr(engine, "gradient_average", True) else 1
        self.device = engine.device
        self.gas = int(engine.gradient_accumulation_steps())
        self.domains = list(domains)
        self._divisor = _GradientDivisor(engine) if self.cfg.enabled else None
        self._capture: Optional[InputCapture] = None
        if self.core.uses_hidden_states:
            module = engine.module
            head = head if head is not None else module.get_output_embeddings()
            if head is None:
                raise ConfigError("adapt.signal=embed needs the final hidden states: the model has no output "
                                  "embeddings (lm_head); pass head=<the output layer module>")
            self._capture = InputCapture(
                head, "the LM head did not run since the last loss(): call the model's forward first")
        from adapt_pretrain.monitor import StatsLayout

        self.layout = StatsLayout.for_adapt(self.cfg, len(self.domains))
        # the step's clock starts at its first training forward (anchor refreshes run in eval mode)
        self._step_clock = engine.module.register_forward_pre_hook(self._start_clock)
        self._model_config = getattr(engine.module, "config", None)
        self._shapes: dict[int, Optional[ModelShape]] = {}
        self._device_name = current_device_name()
        self.consumed_samples = 0  # running totals over all ranks, saved by state_dict()
        self.consumed_tokens = 0
        self.skipped_steps = 0
        self._start_step()

    # ----- per step state ---------------------------------------------------------------------------
    def _start_step(self) -> None:
        from adapt_pretrain.monitor import empty_stats

        # S, sum m w l, loss-carrying tokens, sequences (summed over micro-batches, then over ranks)
        self._totals = torch.zeros(4, dtype=torch.float64, device=self.device)
        self._stats = empty_stats(self.layout, self.device)
        self._micro = 0
        self._seq_len = 0
        self._t0: Optional[float] = None

    def _start_clock(self, module: nn.Module, _inputs: Any) -> None:
        if self._t0 is None and module.training:
            self._t0 = time.perf_counter()

    @property
    def step_index(self) -> int:
        """The optimiser step the next update makes (DeepSpeed's own counter, saved in its checkpoints)."""
        return int(self.engine.global_steps)

    # ----- anchors ----------------------------------------------------------------------------------
    def needs_anchor_refresh(self) -> bool:
        """Same answer on every rank (the centroid is identical everywhere)."""
        return self.core.needs_anchor_refresh(self.step_index)

    @torch.no_grad()
    def refresh_anchors(self, anchor_micro_batches: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Encode this rank's share of the anchors (forward only) and set the centroid from sums
        all-reduced over DP; returns the refresh event (centroid shift, time) for the monitor.
        Collective: every rank calls it with the same number of micro-batches
        (`adapt_pretrain.data.anchors.anchor_batches` pads), since a ZeRO-3 forward gathers weights."""
        start = time.perf_counter()
        if self._capture is None:
            raise RuntimeError("anchor refresh needs adapt.enabled with policy=adapt and signal=embed")
        self._check_same_count(len(anchor_micro_batches))
        hidden_size = None
        sums: Optional[torch.Tensor] = None
        was_training = self.engine.module.training
        self.engine.module.eval()
        try:
            for batch in anchor_micro_batches:
                batch = _on_device(batch, self.device)
                self.engine(input_ids=batch["tokens"])
                hidden = self._capture.pop()
                hidden_size = hidden.shape[-1]
                unit_sum, count = self.core.anchor_partial(hidden.reshape(-1, hidden_size),
                                                           batch["group_id"].reshape(-1),
                                                           batch["position"].reshape(-1), int(batch["num_groups"]))
                part = torch.cat([unit_sum.double(), count.double().reshape(1)])
                sums = part if sums is None else sums + part
        finally:
            self.engine.module.train(was_training)
        if sums is None:
            raise ValueError("refresh_anchors got no anchor micro-batch")
        sums = self._reduce_sum(sums)
        event = self.core.finish_anchor_refresh(sums[:hidden_size].float(), sums[hidden_size].float(),
                                                self.step_index, all_reduce_sum=self._reduce_sum)
        event.pop("step", None)  # the caller logs it at step_index
        event["refresh_time_s"] = time.perf_counter() - start
        return event

    def _check_same_count(self, count: int) -> None:
        if self.world == 1:
            return
        counts = torch.tensor([count, -count], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX, group=self.group)
        if int(counts[0]) != -int(counts[1]):
            raise ValueError(f"anchor micro-batch counts differ over data-parallel ranks (max {int(counts[0])}, "
                             f"min {-int(counts[1])}): build them with anchor_batches(), which pads")

    # ----- loss ---------------------------------------------------------------------------------------
    def loss(self, batch: Mapping[str, Any], logits: torch.Tensor) -> torch.Tensor:
        """The tensor to pass to `backward`: sum(m w l) of this micro-batch with ADAPT on, its masked
        mean cross-entropy with ADAPT off. `logits` is [b, s, V] for `batch["tokens"]` [b, s]; the
        final hidden states come from the same forward (the LM head's captured input)."""
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"micro-batch lacks {', '.join(missing)} (the data stream's micro-batch format)")
        if self._t0 is None:  # a model called some other way than through engine.module's forward
            self._t0 = time.perf_counter()
        num_groups = int(batch["num_groups"])
        labels, mask, group_ids = (batch[k].reshape(-1) for k in ("labels", "loss_mask", "group_id"))
        hidden = None
        if self._capture is not None:
            captured = self._capture.pop()
            hidden = captured.reshape(-1, captured.shape[-1])  # [b*s, H], the token order of the batch tensors
        weights = self.core.group_weights(hidden, group_ids, batch["position"].reshape(-1), num_groups,
                                          self.step_index, self._static_scores(batch))
        flat_logits = logits.reshape(-1, logits.shape[-1])
        if self.cfg.enabled:
            terms = self.core.loss(flat_logits, labels, mask, group_ids, weights.weights, step=self.step_index,
                                   num_contributions=self.gas * self.world)
        else:
            terms = _plain_terms(flat_logits, labels, mask, weights.weights)
        tokens = batch["tokens"]
        self._seq_len = max(self._seq_len, int(tokens.shape[-1]))
        self._totals += torch.stack([terms.normaliser.detach().double(), terms.loss_sum.detach().double(),
                                     mask.sum().double(), torch.tensor(tokens.numel() // tokens.shape[-1],
                                                                       dtype=torch.float64, device=self.device)])
        self._add_stats(batch, terms.token_loss, mask, group_ids, num_groups, terms.weights, weights.scores)
        self._micro += 1
        # ADAPT on: the weighted sum (normalised at the step); off: the plain micro-batch mean
        return terms.loss_sum if self.cfg.enabled else terms.loss_sum / terms.normaliser

    def _static_scores(self, batch: Mapping[str, Any]) -> Optional[torch.Tensor]:
        for key in STATIC_SCORE_KEYS.get(self.cfg.signal, ()):
            if key in batch:
                return batch[key]
        return None

    def _add_stats(self, batch, token_loss, mask, group_ids, num_groups, weights, scores) -> None:
        from adapt_pretrain.monitor import partial_stats

        loss_sums, token_counts = group_loss_means(token_loss, mask, group_ids, num_groups)
        domain = batch.get("group_domain")
        domain = domain.to(self.device) if domain is not None else torch.full((num_groups,), -1, device=self.device)
        self._stats = self._stats.merge(partial_stats(self.layout, weights, scores, token_counts, domain, loss_sums))

    # ----- backward and step ----------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        """`engine.backward` with ADAPT's scaling: weighted sums are not divided by the accumulation
        steps (the global normaliser is applied at the step); ADAPT off is DeepSpeed's default."""
        self.engine.backward(loss, scale_wrt_gas=not self.cfg.enabled)

    def step(self) -> Optional[StepResult]:
        """`engine.step()` after every micro-batch, as in a plain DeepSpeed loop. At the accumulation
        boundary the update uses the global normaliser; returns the step's result there, else None.
        Collective at the boundary (all-reduces over DP)."""
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()
            return None
        if self._micro != self.gas:
            raise RuntimeError(f"{self._micro} micro-batches went through loss() in this step; DeepSpeed's "
                               f"gradient_accumulation_steps is {self.gas}: call loss()/backward()/step() once per micro-batch")
        step = self.step_index
        totals = self._reduce_sum(self._totals)
        normaliser, loss_sum, tokens, samples = (float(x) for x in totals.tolist())
        own_norm = None
        if self._divisor is not None:
            # S == 0: every weight in the global batch is 0, so is the gradient; divide by 1 (no NaN)
            own_norm = self._divisor.step(normaliser / self._reduce_divisor if normaliser > 0 else 1.0)
        else:
            self.engine.step()
        self.core.end_step(self._reduce_sum, self._reduce_max)
        stats = self._stats.reduce(self._reduce_sum, self._reduce_max)
        skipped = not self.engine.was_step_applied()
        self.consumed_samples += int(round(samples))
        self.consumed_tokens += int(round(tokens))
        self.skipped_steps += int(skipped)
        result = StepResult(step=step, loss=loss_sum / normaliser if normaliser > 0 else float("nan"),
                            normaliser=normaliser, num_tokens=int(round(tokens)), num_samples=int(round(samples)),
                            seq_len=self._seq_len, grad_norm=self._grad_norm(own_norm),
                            lr=float(self.engine.get_lr()[0]), skipped=skipped,
                            step_time_s=time.perf_counter() - (self._t0 or time.perf_counter()),
                            consumed_samples=self.consumed_samples, consumed_tokens=self.consumed_tokens,
                            skipped_steps=self.skipped_steps, stats=stats)
        self._start_step()
        return result

    def _grad_norm(self, own_norm: Optional[float]) -> float:
        norm = self.engine.get_global_grad_norm()
        norm = own_norm if norm is None else norm
        return float("nan") if norm is None else float(norm)

    # ----- monitoring -----------------------------------------------------------------------------------
    def metrics(self, result: StepResult) -> tuple[dict[str, float], dict[str, Any]]:
        """(scalars, histograms) of one step: the keys of the module docstring."""
        from adapt_pretrain.monitor import finalize

        scalars = {"loss": result.loss, "lr": result.lr, "train/step_time_s": result.step_time_s,
                   **self._throughput(result),
                   "train/skipped_steps": result.skipped_steps, "train/tokens": result.consumed_tokens,
                   "train/consumed_samples": result.consumed_samples, "adapt/normaliser": result.normaliser}
        if math.isfinite(result.grad_norm):
            scalars["grad_norm"] = result.grad_norm
        metrics = finalize(result.stats, self.domains or None)
        scalars.update(metrics.scalars)
        return scalars, metrics.histograms

    def _throughput(self, result: StepResult) -> dict[str, float]:
        """tokens/s of the global batch (sequences x seq_len, padding included: the model computes on it);
        TFLOP/s per device and MFU only when the model's config gives its shape."""
        positions = result.num_samples * result.seq_len
        seconds = max(result.step_time_s, 1e-9)
        if result.seq_len not in self._shapes:
            config = self._model_config
            self._shapes[result.seq_len] = shape_from_hf_config(config, result.seq_len) if config is not None else None
        shape = self._shapes[result.seq_len]
        if shape is None:
            return {"train/tokens_per_s": positions / seconds}
        return throughput_metrics(positions, seconds, shape, self.world, self._device_name)

    def log(self, monitor: Any, result: StepResult, **extra: float) -> None:
        """Log one step to an `adapt_pretrain.monitor.Monitor` (metrics.jsonl and the W&B mirror,
        curricula included); histograms on the monitor's histogram cadence."""
        scalars, histograms = self.metrics(result)
        scalars.update(extra)
        monitor.log_step(result.step, scalars, histograms if monitor.histogram_due(result.step) else None)

    # ----- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """ADAPT's state (centroid, running statistics) and the monitoring totals, identical on every
        rank: save it with the engine's checkpoint, e.g.
        `engine.save_checkpoint(dir, client_state={"adapt": adapt.state_dict()})`."""
        return {"engine": self.core.state_dict(),
                "counters": {"consumed_samples": self.consumed_samples, "consumed_tokens": self.consumed_tokens,
                             "skipped_steps": self.skipped_steps}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.core.load_state_dict(state["engine"])
        counters = state.get("counters")
        if counters is None:  # saved before the adapter kept them: training state is whole, only the totals restart
            log.warning("the adapt state holds no monitoring totals (saved by an older adapt-pretrain): "
                        "train/consumed_samples, train/tokens and train/skipped_steps count from 0 again")
            return
        self.consumed_samples = int(counters["consumed_samples"])
        self.consumed_tokens = int(counters["consumed_tokens"])
        self.skipped_steps = int(counters["skipped_steps"])

    def close(self) -> None:
        """Remove the adapter's hooks from the model."""
        self._step_clock.remove()
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    # ----- reductions over data-parallel ranks ------------------------------------------------------------
    def _reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def _reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def _reduce(self, tensor: torch.Tensor, op: Any) -> torch.Tensor:
        out = tensor.detach().to(self.device).clone()
        if self.world > 1:
            dist.all_reduce(out, op=op, group=self.group)
        return out.to(tensor.device)


def _plain_terms(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                 weights: torch.Tensor) -> LossTerms:
    """ADAPT off: the masked cross-entropy sum and the masked token count, whose ratio is what a
    plain DeepSpeed loop backpropagates (the micro-batch's masked mean)."""
    token_loss = plain_token_loss(logits, labels)
    mask = loss_mask.float()
    return LossTerms((token_loss * mask).sum(), mask.sum().detach(), token_loss.detach(), weights.detach())


def _on_device(batch: Mapping[str, Any], device: Any) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
