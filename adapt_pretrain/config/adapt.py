"""`AdaptConfig`: the whole user surface of the method.

`enabled` is the one flag; every other field has a default that works (docs/METHOD.md). Each field's
rule is declared next to it and checked at construction, so a bad value fails at start-up with a
message naming the field, not hours into a run.
"""
from __future__ import annotations

from dataclasses import dataclass

from adapt_pretrain.config.base import ConfigError, Section, choice, flag, integer, number

SIGNALS = ("embed", "bm25", "embed-static")
NORMALIZE_MODES = ("weights", "tokens", "sum")
POLICIES = ("adapt", "uniform", "linupper")
STANDARDIZE_SCOPES = ("running", "micro_batch")


@dataclass
class AdaptConfig(Section):
    """ADAPT reweighting settings (docs/METHOD.md).

    enabled: the single switch; False gives plain cross-entropy, bit for bit.
    signal: where the score comes from: the model's own hidden states (`embed`), a BM25 score stored
        in the shards at prepare time (`bm25`), or an external encoder's score stored likewise
        (`embed-static`).
    tau: sigmoid temperature; w_min/w_max: clip bounds of the weight.
    standardize: z-score scores with running global statistics before the sigmoid.
    warmup_steps: weights are 1 for steps < warmup_steps.
    refresh_interval: re-encode the anchors every this many steps (and at step 0).
    normalize: `weights` (sum m w l / sum m w, global), `tokens` (/ sum m), or `sum`.
    policy: `adapt` (similarity weights), `uniform` (w = 1), `linupper` (Sow et al. loss reweighting).
    standardize_momentum: EMA factor of the running score mean/variance.
    standardize_scope: `running` (global statistics of previous steps: a group's weight does not depend
        on its batch-mates, but lags a fast-moving model) or `micro_batch` (z-score among the groups of
        the same micro-batch: no lag; equal across parallel layouts for the same micro-batches).
    linupper_d, linupper_r: LinUpper's clip range and softmax temperature.
    num_anchors: anchor documents used (the paper uses 50 per target).
    """

    SECTION = "adapt"

    enabled: bool = flag(False)
    signal: str = choice("embed", SIGNALS)
    tau: float = number(1.0, above=0)
    w_min: float = number(0.0, minimum=0)
    w_max: float = number(10.0, above=0)
    standardize: bool = flag(False)
    standardize_momentum: float = number(0.5, minimum=0, below=1)
    standardize_scope: str = choice("running", STANDARDIZE_SCOPES)
    warmup_steps: int = integer(0, minimum=0)
    refresh_interval: int = integer(50, minimum=1)
    normalize: str = choice("weights", NORMALIZE_MODES)
    policy: str = choice("adapt", POLICIES)
    linupper_d: float = number(1.0, above=0)
    linupper_r: float = number(1.0, above=0)
    num_anchors: int = integer(50, minimum=1)

    def check(self) -> None:
        if self.w_max < self.w_min:
            raise ConfigError(f"adapt.w_max={self.w_max} must be > 0 and >= w_min={self.w_min}")


__all__ = ["AdaptConfig", "SIGNALS", "NORMALIZE_MODES", "POLICIES", "STANDARDIZE_SCOPES"]
