"""FLOPs per compared run: training compute plus what the method spends on scoring (issue 6).

All runs train the same number of tokens with the same model, so `training` is equal by design;
the table reports `total / training` as each method's overhead. Conventions are those of
`adapt_pretrain.flops` (multiply-add = 2 FLOPs, training = 3 forwards).
- adapt (embed): pooling + scoring per token/group and the anchor re-encoding forwards.
- adapt-bm25 / topk-bm25: the BM25 pass over every candidate (training) token at prepare time.
- topk-embed: training the proxy model plus one forward over the candidates and anchors.
- linupper: per-group loss sums and token weights (2 FLOPs per token) on top of training.
- static-mix: nothing here: the weights are given (a DoReMi/RegMix search would cost its proxies).
"""
from __future__ import annotations

from dataclasses import dataclass

from adapt_pretrain.flops import (FlopsReport, ModelShape, adapt_flops, bm25_flops, embedding_selection_flops,
                                  training_flops)
from adapt_pretrain.methods.presets import MethodPreset


@dataclass(frozen=True)
class ScoringWork:
    """Sizes of the offline scoring work of one comparison (shared by its runs)."""

    candidate_tokens: int = 0   # tokens of the full training split (what BM25 / embeddings score)
    num_anchors: int = 0
    anchor_tokens: int = 0      # anchor tokens one encoding forward sees (truncated to seq_len)
    proxy_tokens: int = 0       # tokens trained by the top-k-embed proxy model
    embed_tokens: int = 0       # tokens forwarded by the top-k-embed scoring pass (docs + anchors)


def run_flops(preset: MethodPreset, shape: ModelShape, tokens: int, steps: int, groups: int,
              refresh_interval: int, work: ScoringWork) -> FlopsReport:
    """FLOPs of one run of `preset` that trained `tokens` tokens in `steps` steps over `groups` token groups."""
    overrides = set(preset.overrides)
    if "adapt.policy=adapt" in overrides and "adapt.signal=embed" in overrides:
        return adapt_flops(shape, tokens, groups, steps, refresh_interval, work.anchor_tokens)
    report = FlopsReport(training=training_flops(shape, tokens))
    if "adapt.signal=bm25" in overrides or preset.selection == "bm25":
        report.prepare_scoring = bm25_flops(work.candidate_tokens, work.num_anchors)
    elif preset.selection == "embed":
        report.prepare_scoring = training_flops(shape, work.proxy_tokens) + embedding_selection_flops(shape, work.embed_tokens)
    if "adapt.policy=linupper" in overrides:
        report.online_scoring = 2 * tokens
    return report
