"""Baselines and method presets for the equal-FLOPs comparison.

Pure data-selection and mixing logic lives here, apart from the trainer: a method is a set of
RunConfig overrides plus, for offline methods, a derived data directory built once at prepare time.
"""
from adapt_pretrain.experiments.methods.mixing import (domain_schedule, domain_token_targets, normalize_domain_weights,
                                                       repeat_counts)
from adapt_pretrain.experiments.methods.presets import PRESETS, MethodPreset, get_preset
from adapt_pretrain.experiments.methods.selection import select_top_fraction

__all__ = ["PRESETS", "MethodPreset", "get_preset", "select_top_fraction", "normalize_domain_weights",
           "domain_token_targets", "repeat_counts", "domain_schedule"]
