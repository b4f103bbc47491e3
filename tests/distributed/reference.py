"""Independent end-to-end reference for the layout tests: the tiny GPT and the method, plain torch fp64.

The layout tests also compare every layout with a one-process run of the step engine, which cannot
see a bug that every layout shares (a per-micro-batch normaliser, a gradient leaking through the
weights, a wrong EMA). This module shares no code with the step engine (adapt_pretrain/megatron),
the core (adapt_pretrain/core) or the kernels: the model is written out from megatron-core's GPT
(local layer spec) on the full single-process state dict, the whole global batch goes through one
forward, the method is written from its definition (docs/METHOD.md), and autograd gives the gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

IGNORE_LABEL = -100
STD_EPS = 1e-6  # running standardisation: z = (s - mean) / sqrt(var + STD_EPS) (docs/METHOD.md)

Params = dict[str, torch.Tensor]


# ----- the model -----------------------------------------------------------------------------------
def gpt_forward(params: Params, tokens: torch.Tensor, num_heads: int,
                eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states [b, s, H], logits [b, s, V]) of megatron's GPTModel with the local layer
    spec: learned absolute positions, pre-LayerNorm blocks, causal multi-head attention with QKV
    stored per head as [q; k; v], exact-erf GELU MLP, final LayerNorm, output layer tied to the word
    embedding. Computed in the dtype of `params`."""
    b, s = tokens.shape
    word = params["embedding.word_embeddings.weight"]
    x = word[tokens] + params["embedding.position_embeddings.weight"][:s]
    hidden_size = x.shape[-1]
    head_dim = hidden_size // num_heads
    future = torch.ones(s, s, dtype=torch.bool).triu(diagonal=1)

    def norm(value: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(value, (hidden_size,), params[name + ".weight"], params[name + ".bias"], eps)

    def linear(value: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(value, params[name + ".weight"], params[name + ".bias"])

    layer = 0
    while f"decoder.layers.{layer}.input_layernorm.weight" in params:
        prefix = f"decoder.layers.{layer}."
        qkv = linear(norm(x, prefix + "input_layernorm"), prefix + "self_attention.linear_qkv")
        q, k, v = qkv.view(b, s, num_heads, 3 * head_dim).split(head_dim, dim=-1)
        scores = torch.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(head_dim)
        attention = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        context = torch.einsum("bnqk,bknd->bqnd", attention, v).reshape(b, s, hidden_size)
        x = x + linear(context, prefix + "self_attention.linear_proj")
        h = F.gelu(linear(norm(x, prefix + "pre_mlp_layernorm"), prefix + "mlp.linear_fc1"))
        x = x + linear(h, prefix + "mlp.linear_fc2")
        layer += 1
    hidden = norm(x, "decoder.final_layernorm")
    return hidden, hidden @ word.t()


# ----- the global batch ----------------------------------------------------------------------------
@dataclass
class GlobalBatch:
    """All micro-batches of a step stacked into one [N, s] batch; group ids renumbered globally."""

    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    group: torch.Tensor      # global group id per token, -1 for padding
    position: torch.Tensor
    num_groups: int

    @classmethod
    def stack(cls, micro_batches: list[dict[str, Any]]) -> "GlobalBatch":
        groups, offset = [], 0
        for mb in micro_batches:
            gid = mb["group_id"]
            groups.append(torch.where(gid >= 0, gid + offset, gid))
            offset += int(mb["num_groups"])
        cat = lambda key: torch.cat([mb[key] for mb in micro_batches])  # noqa: E731
        return cls(cat("tokens"), cat("labels"), cat("loss_mask").double(), torch.cat(groups), cat("position"), offset)


def group_embeddings(hidden: torch.Tensor, batch: GlobalBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """phi_g = normalize(sum_{t in g} position_t h_t): ([G, H] unit rows, mask of groups with mass).
    A group with no tokens has no embedding (its row is 0 and it is not present)."""
    member = (batch.group.unsqueeze(-1) == torch.arange(batch.num_groups)).to(hidden.dtype)  # [N, s, G]
    pooled = torch.einsum("nsg,ns,nsh->gh", member, batch.position.to(hidden.dtype), hidden.detach())
    norms = pooled.norm(dim=1)
    present = norms > 0
    return pooled / torch.where(present, norms, torch.ones_like(norms)).unsqueeze(1), present


def token_losses(logits: torch.Tensor, batch: GlobalBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token cross-entropy, mask of tokens that carry a loss: loss_mask 1, a real label, a real
    group)."""
    carries = (batch.loss_mask > 0) & (batch.labels != IGNORE_LABEL) & (batch.group >= 0)
    logp = logits.log_softmax(dim=-1)
    loss = -logp.gather(-1, batch.labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return loss * carries, carries


def group_mean_losses(loss: torch.Tensor, carries: torch.Tensor, batch: GlobalBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss of each group's loss-carrying tokens, mask of groups that have any), detached."""
    member = (batch.group.unsqueeze(-1) == torch.arange(batch.num_groups)) & carries.unsqueeze(-1)
    counts = member.sum(dim=(0, 1)).to(loss.dtype)
    sums = (member.to(loss.dtype) * loss.detach().unsqueeze(-1)).sum(dim=(0, 1))
    return sums / counts.clamp_min(1), counts > 0


# ----- the method ----------------------------------------------------------------------------------
class Method:
    """The method's formulas, with the settings of the AdaptConfig the layouts ran with (read only)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def adapt_weights(self, scores: torch.Tensor, stats: Optional[tuple[float, float]]) -> torch.Tensor:
        """w = clip(sigmoid(z / tau), w_min, w_max), z = s or (s - mean) / sqrt(var + eps)."""
        z = scores if stats is None else (scores - stats[0]) / math.sqrt(stats[1] + STD_EPS)
        return torch.sigmoid(z / self.cfg.tau).clamp(self.cfg.w_min, self.cfg.w_max)

    def linupper_weights(self, means: torch.Tensor, loss_range: tuple[float, float]) -> torch.Tensor:
        """Group mean losses min-max normalised to [-d, d] by the previous step's global range,
        w' = min(l + d, d), w = exp((w' - d) / r) (the softmax up to its denominator)."""
        d, (lo, hi) = self.cfg.linupper_d, loss_range
        normalised = ((means - lo) / (hi - lo) * 2 * d - d).clamp(-d, d)
        return torch.exp((torch.clamp(normalised + d, max=d) - d) / self.cfg.linupper_r)

    def loss(self, logits: torch.Tensor, batch: GlobalBatch, group_weights: torch.Tensor) -> torch.Tensor:
        """sum(m w l) / sum(m w) (`weights`) or / sum(m) (`tokens`) over the whole global batch, with m
        the tokens that carry a loss; the weights are constants."""
        loss, carries = token_losses(logits, batch)
        m = carries.to(loss.dtype)
        w = group_weights.detach()[batch.group.clamp_min(0)] * m
        total = (w * loss).sum()
        if self.cfg.normalize == "weights":
            return total / w.sum()
        if self.cfg.normalize == "tokens":
            return total / m.sum()
        raise ValueError(f"the reference has no normalisation {self.cfg.normalize!r}")


@dataclass
class StepReference:
    """What one step must produce: the loss, the gradient (as the optimizer sees it, after clipping)
    and its norm before clipping, the group weights; and what they came from: the scores and centroid
    (ADAPT), the loss range the weights were normalised with (LinUpper)."""

    loss: float
    grad_norm: float
    grads: Params
    weights: torch.Tensor
    scores: Optional[torch.Tensor] = None
    centroid: Optional[torch.Tensor] = None
    loss_range: Optional[tuple[float, float]] = None


def _leaf(params: Params) -> Params:
    return {k: v.detach().double().clone().requires_grad_(True) for k, v in params.items()}


class Reference:
    """Replays a run of the method step by step on given parameters, in fp64."""

    def __init__(self, method: Method, num_heads: int, clip_grad: float) -> None:
        self.method = method
        self.num_heads = num_heads
        self.clip_grad = clip_grad

    def centroid(self, params: Params, anchors: list[dict[str, Any]]) -> torch.Tensor:
        """Mean unit embedding of the anchor groups that have tokens (empty ones are not counted)."""
        batch = GlobalBatch.stack(anchors)
        with torch.no_grad():
            hidden, _ = gpt_forward({k: v.double() for k, v in params.items()}, batch.tokens, self.num_heads)
        units, present = group_embeddings(hidden, batch)
        return units[present].sum(0) / present.sum()

    def step(self, params: Params, micro_batches: list[dict[str, Any]],
             weights_for: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
             ) -> tuple[StepReference, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step on the whole global batch. `weights_for(units, present, group_means, has_loss)`
        gives the group weights. Returns the step and (units, group means, has_loss) for the caller's
        running state."""
        leaves = _leaf(params)
        batch = GlobalBatch.stack(micro_batches)
        hidden, logits = gpt_forward(leaves, batch.tokens, self.num_heads)
        units, present = group_embeddings(hidden, batch)
        loss, carries = token_losses(logits, batch)
        means, has_loss = group_mean_losses(loss, carries, batch)
        weights = weights_for(units, present, means, has_loss).detach()
        total = self.method.loss(logits, batch, weights)
        grads = torch.autograd.grad(total, list(leaves.values()))
        norm = float(torch.sqrt(sum((g * g).sum() for g in grads)))
        clip = min(1.0, self.clip_grad / (norm + 1e-6)) if self.clip_grad > 0 else 1.0
        result = StepReference(float(total.detach()), norm, {k: g * clip for k, g in zip(leaves, grads)}, weights)
        return result, units, means, has_loss

    # ----- whole runs (the parameters before each step come from the run under test) ---------------
    def adapt_run(self, params_before: list[Params], batches: list[list[dict]],
                  anchors: list[dict]) -> list[StepReference]:
        """ADAPT with the anchor centroid refreshed at step 0 and every `refresh_interval` steps and,
        with `standardize`, running statistics: an EMA (momentum m: new = m old + (1 - m) batch) of the
        global batch's score mean and population variance as of the end of the previous step, none
        (uniform weights) until a step has ended, and re-estimated at each refresh from the previous
        step's group embeddings scored against the new centroid."""
        method, cfg, out = self.method, self.method.cfg, []
        centroid: Optional[torch.Tensor] = None
        stats: Optional[tuple[float, float]] = None
        previous_units: Optional[torch.Tensor] = None
        for step, (params, micro_batches) in enumerate(zip(params_before, batches)):
            if step % cfg.refresh_interval == 0:
                centroid = self.centroid(params, anchors)
                if cfg.standardize and previous_units is not None:
                    stats = _mean_var(previous_units @ centroid)
            scored: dict[str, torch.Tensor] = {}

            def weights_for(units, present, means, has_loss):
                scored["scores"] = units @ centroid
                if cfg.standardize and stats is None:
                    return torch.ones_like(scored["scores"])
                return method.adapt_weights(scored["scores"], stats if cfg.standardize else None)

            result, units, _, _ = self.step(params, micro_batches, weights_for)
            result.scores, result.centroid = scored["scores"], centroid
            if cfg.standardize:
                m, batch_stats = cfg.standardize_momentum, _mean_var(result.scores)
                stats = batch_stats if stats is None else tuple(m * old + (1 - m) * new
                                                                for old, new in zip(stats, batch_stats))
            previous_units = units
            out.append(result)
        return out

    def linupper_run(self, params_before: list[Params], batches: list[list[dict]]) -> list[StepReference]:
        """LinUpper: uniform at step 0; then weights from each group's mean loss normalised by the
        previous global batch's range (min and max over groups with loss-carrying tokens)."""
        out, loss_range = [], None

        def weights_for(units, present, means, has_loss):
            if loss_range is None:
                return torch.ones_like(means)
            return self.method.linupper_weights(means, loss_range)

        for params, micro_batches in zip(params_before, batches):
            result, _, means, has_loss = self.step(params, micro_batches, weights_for)
            result.loss_range = loss_range
            loss_range = (float(means[has_loss].min()), float(means[has_loss].max()))
            out.append(result)
        return out


def _mean_var(scores: torch.Tensor) -> tuple[float, float]:
    s = scores.double()
    return float(s.mean()), float(s.var(unbiased=False))
