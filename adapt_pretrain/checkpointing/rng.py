"""Every RNG stream of a rank (python, numpy, torch CPU and CUDA), saved and restored bit for bit."""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Every random stream a step can touch (dropout, init, sampling) so a resume replays them."""
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
        try:
            from megatron.core import tensor_parallel

            state["megatron_cuda_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
        except Exception:  # tracker not initialised (e.g. a plain torch model): nothing to save
            pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
        if "megatron_cuda_tracker" in state:
            from megatron.core import tensor_parallel

            tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_cuda_tracker"])
