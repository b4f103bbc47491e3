"""Run megatron-core 0.16.1 on CPU/gloo: every CUDA redirection in one place.

Active only when CUDA is absent (`activate()` returns False and changes nothing on a GPU machine).
Why each redirection exists (megatron-core 0.16.1 hard-codes CUDA in code paths we use):

1. `device="cuda"` / `device=torch.cuda.current_device()` in tensor factories of
   `pipeline_parallel.schedules` (total_num_tokens), `pipeline_parallel.p2p_communication`
   (shape exchange, receive buffers), `distributed.param_and_grad_buffer` (grad buffers),
   `models.common.embeddings.rotary_pos_embedding` (RoPE frequencies),
   `optimizer.clip_grads` and `optimizer.optimizer` (norm / overflow scalars), `utils`
   (GlobalMemoryBuffer used by the local attention's baddbmm), `transformer.utils` (default
   causal mask), `tensor_parallel.mappings` and `tensor_parallel.layers` (sequence-parallel
   gather/scatter buffers, forward and backward), `models.common.embeddings.rotary_pos_embedding`
   (RoPE moves its inverse frequencies to `torch.cuda.current_device()` in every forward). We do NOT install a
   global TorchFunctionMode (it would tax every op of the hot path); instead each of those modules'
   global name `torch` is replaced by a thin proxy whose factory functions map a CUDA device to CPU
   and whose `torch.cuda.current_device()` / `synchronize()` are CPU-safe. Everything else is the
   real torch module.
2. `tensor_parallel.random.CudaRNGStatesTracker.fork` reads/writes the CUDA RNG state; on CPU it
   becomes a no-op context (TP-region dropout is then not decorrelated across TP ranks on CPU;
   CPU runs are for tests and demos, which use dropout 0). For the same reason activation
   recomputation (`tensor_parallel.checkpoint`) saves and restores an empty CUDA RNG state.
3. `optimizer.clip_grads.clip_grad_by_total_norm_fp32` asserts `torch.cuda.FloatTensor` grads;
   replaced (in the `optimizer` module namespace, where it is imported by name) by a same-math
   CPU version.
4. `Tensor.cuda()` in `LanguageModule.setup_embeddings_and_output_layer` (tied embeddings with
   PP > 1 all-reduce the first stage's embedding into the last stage's copy): during model
   construction only, `model_construction()` makes `Tensor.cuda` return the tensor unchanged.
5. `dist_checkpointing` (sharded checkpoints): `strategies.filesystem_async`, `.async_utils`,
   `.fully_parallel` call `torch.cuda.synchronize()` / `torch.cuda.current_device()`, and
   `strategies.state_dict_saver` builds a flag with `device='cuda'` (same torch proxy as item 1).
   The fully parallel *load* exchange (`exchange_utils`) moves tensors with `Tensor.cuda()`, which
   the proxy cannot reach: on CPU sharded checkpoints are loaded without it (each rank reads what
   it needs; see `adapt_pretrain.megatron.dist_ckpt`).
6. Schedule flags (applied by `schedule_flags()`, used by the step engine when building the
   TransformerConfig): `batch_p2p_sync=False` (it calls `torch.cuda.synchronize`), and
   `batch_p2p_comm=False` for the interleaved schedule: with pp=2, vp=2 on gloo the batched
   isend/irecv path gives WRONG gradients silently (measured; docs/PARALLELISM.md); the unbatched path is correct.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any

import torch

_ACTIVE = False
_PATCHED_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.utils",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like", "empty_like")


def cuda_available() -> bool:
    return torch.cuda.is_available()


def _cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int):
        return "cpu"
    if isinstance(device, torch.device):
        return "cpu" if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    return device


def _redirect(fn):
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    return wrapper


class _Proxy(types.ModuleType):
    """Delegates every attribute to `real` except the overrides given."""

    def __init__(self, real: types.ModuleType, overrides: dict[str, Any]) -> None:
        super().__init__(real.__name__)
        self._real = real
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:  # only called when not found in __dict__
        return getattr(self._real, name)


def _make_torch_proxy() -> _Proxy:
    cuda = _Proxy(torch.cuda, {"current_device": lambda: "cpu", "synchronize": lambda *a, **k: None})
    overrides: dict[str, Any] = {name: _redirect(getattr(torch, name)) for name in _FACTORIES}
    overrides["cuda"] = cuda
    return _Proxy(torch, overrides)


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Same math as megatron's `clip_grad_by_total_norm_fp32`, without its CUDA type assert."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


@contextlib.contextmanager
def _no_fork(self, name: str = "model-parallel-rng"):
    yield


def activate() -> bool:
    """Install the CPU redirections once; returns True when active (no CUDA), False on GPU."""
    global _ACTIVE
    if cuda_available():
        return False
    if _ACTIVE:
        return True
    import importlib

    proxy = _make_torch_proxy()
    for name in _PATCHED_MODULES:
        module = importlib.import_module(name)
        module.torch = proxy
    from megatron.core.optimizer import optimizer as mc_optimizer
    from megatron.core.tensor_parallel import random as mc_random

    mc_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    mc_random.CudaRNGStatesTracker.fork = _no_fork
    mc_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mc_random._set_cuda_rng_state = lambda *args, **kwargs: None
    _ACTIVE = True
    return True


@contextlib.contextmanager
def model_construction():
    """While building megatron modules on CPU, `Tensor.cuda()` is the identity (see item 4)."""
    if not _ACTIVE:
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def is_active() -> bool:
    return _ACTIVE


def schedule_flags(interleaved: bool) -> dict[str, bool]:
    """TransformerConfig p2p flags: CPU needs batch_p2p_sync=False, and batch_p2p_comm=False when
    interleaved (silent wrong-gradient bug on gloo); GPU keeps megatron's defaults."""
    if cuda_available():
        return {}
    flags = {"batch_p2p_sync": False}
    if interleaved:
        flags["batch_p2p_comm"] = False
    return flags
