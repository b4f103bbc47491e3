"""`InputCapture`: keeps the input of one module (the LM head) from each forward.

Both framework adapters take the final hidden states (after the final norm) from the training
forward itself, so the weights cost no second forward: a forward pre-hook on the output layer.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class InputCapture:
    """Forward pre-hook on `module`; `pop()` hands over (and forgets) the last input it saw."""

    def __init__(self, module: nn.Module, missing: str) -> None:
        """`missing`: the error message when `pop()` finds no input (the module did not run)."""
        self._hidden: Optional[torch.Tensor] = None
        self._missing = missing
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple) -> None:
        self._hidden = args[0]

    def pop(self) -> torch.Tensor:
        hidden, self._hidden = self._hidden, None
        if hidden is None:
            raise RuntimeError(self._missing)
        return hidden

    def remove(self) -> None:
        self._handle.remove()
