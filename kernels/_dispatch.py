"""Backend choice for every kernel: compiled Triton on CUDA, the torch reference on CPU.

`ADAPT_KERNELS_FORCE_TRITON=1` routes CPU tensors to the Triton kernels too; combined with
`TRITON_INTERPRET=1` (which must be set before triton is imported) this runs the kernels in
Triton's interpreter, which is how the CPU test-suite proves the kernels themselves. Triton is
imported lazily (only when a Triton path is taken) so that importing this package never fixes
the interpreter mode for the rest of the process.
"""
from __future__ import annotations

import os

import torch

FORCE_TRITON_ENV = "ADAPT_KERNELS_FORCE_TRITON"


def use_triton(tensor: torch.Tensor) -> bool:
    """True when `tensor` should go through the Triton kernels."""
    return tensor.is_cuda or os.environ.get(FORCE_TRITON_ENV, "0") == "1"
