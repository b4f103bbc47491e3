"""Fused kernels for the ADAPT loss path (Triton on CUDA, torch reference on CPU).

Set `ADAPT_KERNELS_FORCE_TRITON=1` (with `TRITON_INTERPRET=1` before triton is imported) to run
the Triton kernels on CPU tensors in Triton's interpreter; see docs/KERNELS.md.
"""
from .cross_entropy import weighted_cross_entropy
from .pooling import group_pool, score_and_weight

__all__ = ["weighted_cross_entropy", "group_pool", "score_and_weight"]
