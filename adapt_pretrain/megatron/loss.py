"""The last-stage loss_func: ADAPT weights from the forward's own hidden states, weighted CE.

`StepAccumulator` collects what the step engine needs after the schedule (sums for the global
normaliser, per-group monitoring rows) because megatron's forward_data_store only keeps what the
loss_func reports, and the schedule may scale it in place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from adapt_pretrain.core import AdaptEngine, LossTerms, group_loss_means
from adapt_pretrain.megatron.batch import pooling_view


@dataclass
class TPContext:
    """Tensor-parallel facts the loss needs (vocab shard, sequence shard)."""

    group: Any
    rank: int
    size: int
    sequence_parallel: bool

    @property
    def loss_group(self) -> Any:
        return self.group if self.size > 1 else None


@dataclass
class StepAccumulator:
    """Per-step sums on the last stage: [normaliser, weighted loss sum, masked tokens] (fp64) and
    per-group monitoring rows (one entry per micro-batch)."""

    device: torch.device
    totals: torch.Tensor = None  # type: ignore[assignment]
    groups: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.groups = []


def group_signal_input(engine: AdaptEngine, hidden: Optional[torch.Tensor], batch: dict[str, Any],
                       tp: TPContext) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(hidden [T,H], group ids [T], positions [T]) for engine.group_weights / anchor_partial.

    Hidden is megatron's [s, b, H] viewed as [s*b, H] with s-major side data. With TP > 1 each
    rank pools locally and the [G, H] sums are made identical on every TP rank: all-reduced under
    sequence parallelism (each rank holds a sequence shard), broadcast from TP rank 0 without it
    (each rank holds its own copy of the full hidden states, equal only up to the rounding of
    its all-reduce and the order of the GPU pooling atomics). The engine then gets the pooled rows
    as "tokens" with identity groups and position 1 (pool of one row times 1.0 is exact), so its
    own scoring code runs unchanged and every TP rank derives bit-identical scores, weights,
    normalisers and running statistics from the same rows.
    """
    gid = pooling_view(batch, "group_id", tp.rank, tp.size, tp.sequence_parallel)
    pos = pooling_view(batch, "position", tp.rank, tp.size, tp.sequence_parallel)
    if hidden is None:
        return None, gid, pos
    flat = hidden.detach().reshape(-1, hidden.shape[-1])
    if tp.size == 1:
        return flat, gid, pos
    from adapt_pretrain.core import pool_groups

    num_groups = batch["num_groups"]
    pooled = pool_groups(flat, gid, pos, num_groups)
    if tp.sequence_parallel:
        dist.all_reduce(pooled, group=tp.group)
    else:
        dist.broadcast(pooled, src=dist.get_global_rank(tp.group, 0), group=tp.group)
    ids = torch.arange(num_groups, device=pooled.device)
    return pooled, ids, torch.ones(num_groups, dtype=pos.dtype, device=pooled.device)


def static_scores(engine: AdaptEngine, batch: dict[str, Any]) -> Optional[torch.Tensor]:
    """Per-group scores stored in the shards, for the static signals."""
    if engine.cfg.signal == "bm25":
        return batch.get("group_bm25")
    if engine.cfg.signal == "embed-static":
        return batch.get("group_static_score", batch.get("group_bm25"))
    return None


def plain_terms(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                weights: torch.Tensor) -> LossTerms:
    """ADAPT off = plain megatron GPT training, bit for bit: megatron's vocab-parallel CE (what
    GPTModel.compute_language_model_loss uses at any TP size) and pretrain_gpt's masked sum."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    token_loss = vocab_parallel_cross_entropy(logits, labels)
    mask = loss_mask.view(-1).float()
    loss_sum = torch.sum(token_loss.view(-1).float() * mask)
    return LossTerms(loss_sum, mask.sum().detach(), token_loss.detach().float(), weights.detach())


def adapt_loss(engine: AdaptEngine, step: int, batch: dict[str, Any], logits: torch.Tensor,
               hidden: Optional[torch.Tensor], tp: TPContext, num_contributions: int,
               acc: StepAccumulator) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Megatron loss_func body: returns (weighted loss sum, masked-token count (int), report).

    The float normaliser (sum m w for `weights` mode) goes to `acc`; the step engine's
    finalize_model_grads hook divides gradients by its global sum. ADAPT off (and engine=None,
    plain training: the same code) computes megatron's own plain loss (`plain_terms`).
    """
    num_groups = batch["num_groups"]
    labels = batch["labels"].reshape(-1)
    mask = batch["loss_mask"].reshape(-1)
    gid_loss = batch["group_id"].reshape(-1)
    needs_hidden = engine.uses_hidden_states
    h, gid_pool, pos_pool = group_signal_input(engine, hidden if needs_hidden else None, batch, tp)
    gw = engine.group_weights(h, gid_pool, pos_pool, num_groups, step, static_scores(engine, batch))
    flat_logits = logits.reshape(-1, logits.shape[-1])
    if engine.cfg.enabled:
        # in-place: the logits come straight out of the output layer and nothing reads them after
        # the loss (megatron's own CE, the ADAPT-off path, overwrites them too)
        terms = engine.loss(flat_logits, labels, mask, gid_loss, gw.weights, step=step, tp_group=tp.loss_group,
                            vocab_start=tp.rank * flat_logits.shape[-1], num_contributions=num_contributions,
                            inplace_backward=True)
    else:
        terms = plain_terms(flat_logits, labels, mask, gw.weights)
    loss_sum = terms.loss_sum
    num_tokens = mask.sum().to(torch.int)
    acc.totals += torch.stack([terms.normaliser.double(), loss_sum.detach().double(), num_tokens.double()])
    loss_sums, token_counts = group_loss_means(terms.token_loss, mask, gid_loss, num_groups)
    row = {"weights": terms.weights.detach().float(), "scores": gw.scores.detach().float(),
           "group_tokens": token_counts, "group_loss_sum": loss_sums}
    for key in ("group_domain", "group_doc_id"):
        if key in batch:
            row[key] = batch[key].detach()
    acc.groups.append(row)
    report = {"loss_sum": loss_sum.detach().clone(), "normaliser": terms.normaliser.detach().clone()}
    return loss_sum, num_tokens, report
