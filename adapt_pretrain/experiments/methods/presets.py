"""Method presets: each compared method as RunConfig overrides plus an optional offline data step.

Online methods (ADAPT, ADAPT-BM25, LinUpper) are one trainer run with different `adapt.*` keys.
Offline methods (top-k selection, static mixing) train plainly on a derived data directory built
once at prepare time; the loader repeats it as needed so every method sees the same token count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class MethodPreset:
    """One compared method.

    overrides: dotted RunConfig overrides (the `adapt-pretrain train key=value` form).
    selection: offline top-k score source (`bm25` or `embed`), or None.
    mixing: train on the static domain mixture given in the comparison config.
    """

    name: str
    description: str
    overrides: tuple[str, ...]
    selection: Optional[str] = None
    mixing: bool = False

    @property
    def data_variant(self) -> Optional[str]:
        """Name of the derived data directory this method trains on (None: the prepared data)."""
        if self.selection:
            return f"topk-{self.selection}"
        return "static-mix" if self.mixing else None

    def run_overrides(self, seed: int, run_dir: str, data_dir: str, extra: tuple[str, ...] = ()) -> list[str]:
        """Every override for one run of this method: preset keys, then per-method extras, then identity."""
        return [*self.overrides, *extra, f"train.seed={seed}", f"train.run_dir={run_dir}", f"data.data_dir={data_dir}"]


_PLAIN = ("adapt.enabled=false",)
PRESETS: dict[str, MethodPreset] = {p.name: p for p in (
    MethodPreset("uniform", "plain training on the full mixture (every token weight 1)", _PLAIN),
    MethodPreset("adapt", "ADAPT: online weights from the model's own hidden states vs the anchor centroid",
                 ("adapt.enabled=true", "adapt.policy=adapt", "adapt.signal=embed")),
    MethodPreset("adapt-std", "ADAPT with z-scored similarities (adapt.standardize) before the sigmoid",
                 ("adapt.enabled=true", "adapt.policy=adapt", "adapt.signal=embed", "adapt.standardize=true")),
    MethodPreset("adapt-bm25", "ADAPT with the static BM25-to-anchors score stored at prepare time",
                 ("adapt.enabled=true", "adapt.policy=adapt", "adapt.signal=bm25")),
    MethodPreset("topk-embed", "offline top-k by a proxy model's embedding similarity to the anchors, repeated",
                 _PLAIN, selection="embed"),
    MethodPreset("topk-bm25", "offline top-k by BM25 similarity to the anchors, repeated", _PLAIN, selection="bm25"),
    MethodPreset("static-mix", "static domain weights given in the config (DoReMi/RegMix output form)",
                 _PLAIN, mixing=True),
    MethodPreset("linupper", "LinUpper (Sow et al.): online loss-based reweighting",
                 ("adapt.enabled=true", "adapt.policy=linupper")),
)}


def get_preset(name: str) -> MethodPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(PRESETS)}") from None
