"""Map a full (single-process layout) GPT state dict onto this rank's TP/PP shards and back.

Used by the layout-equivalence tests (load identical weights into every layout, gather updated
weights/gradients to compare), and usable to export/import a layout-free model. Names are the
single-process GPTModel's (global layer indices); tensor-parallel params are split along their
`partition_dim` (QKV is stored per query group, so a contiguous split is the megatron split;
SwiGLU's fc1 is [gate; up] per shard, handled explicitly). With tied embeddings, the last stage's
output-layer copy maps to `embedding.word_embeddings.weight`.

Load before `build_optimizer` (bf16 runs keep fp32 main copies made at optimizer construction),
or call `optimizer.reload_model_params()` afterwards.
"""
from __future__ import annotations

import re
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from adapt_pretrain.megatron.model import unwrap

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
TIED = "embedding.word_embeddings.weight"


def _global_names(gpt: nn.Module) -> Iterator[tuple[str, str, nn.Parameter]]:
    """(local name, global name, param) for every parameter of one GPTModel chunk."""
    tied = getattr(gpt, "share_embeddings_and_output_weights", False)
    for name, param in gpt.named_parameters():
        match = _LAYER.match(name)
        if match:
            layer = gpt.decoder.layers[int(match.group(1))]
            name_global = f"decoder.layers.{layer.layer_number - 1}." + name[match.end():]
        elif tied and name == "output_layer.weight":
            name_global = TIED
        else:
            name_global = name
        yield name, name_global, param


def _is_swiglu_fc1(gpt: nn.Module, name: str) -> bool:
    return bool(getattr(gpt.config, "gated_linear_unit", False)) and ".mlp.linear_fc1." in name


def _shard(full: torch.Tensor, param: nn.Parameter, tp_rank: int, tp_size: int, swiglu: bool) -> torch.Tensor:
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if swiglu:
        gate, up = torch.chunk(full, 2, dim=dim)
        return torch.cat([torch.chunk(gate, tp_size, dim=dim)[tp_rank], torch.chunk(up, tp_size, dim=dim)[tp_rank]],
                         dim=dim)
    return torch.chunk(full, tp_size, dim=dim)[tp_rank]


@torch.no_grad()
def load_full_state_dict(model_chunks: list[nn.Module], full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shards of `full` (single-process names) into the model chunks."""
    from megatron.core import parallel_state as ps

    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for chunk in model_chunks:
        gpt = unwrap(chunk)
        for name, name_global, param in _global_names(gpt):
            if name_global not in full:
                raise KeyError(f"full state dict lacks {name_global!r} (for {name})")
            value = _shard(full[name_global], param, tp_rank, tp_size, _is_swiglu_fc1(gpt, name))
            if value.shape != param.shape:
                raise ValueError(f"{name_global}: shard shape {tuple(value.shape)} != parameter {tuple(param.shape)}")
            param.copy_(value.to(param.device, param.dtype))


@torch.no_grad()
def gather_full_state_dict(model_chunks: list[nn.Module], attr: str = "data") -> dict[str, torch.Tensor]:
    """The full single-process state dict (or `attr="main_grad"`: gradients), on every rank, CPU fp32.

    Collective over the whole world (TP all-gather, then an object all-gather). Meant for tests and
    exports of small models, not for checkpointing big ones.
    """
    from megatron.core import parallel_state as ps

    tp_group, tp_size = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    local: dict[str, torch.Tensor] = {}
    for chunk in model_chunks:
        gpt = unwrap(chunk)
        for name, name_global, param in _global_names(gpt):
            if name_global == TIED and name == "output_layer.weight":
                continue  # duplicate of the first stage's embedding (kept equal by megatron)
            tensor = param if attr == "data" else getattr(param, attr)
            tensor = tensor.detach().float()
            if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
                parts = [torch.empty_like(tensor) for _ in range(tp_size)]
                dist.all_gather(parts, tensor.contiguous(), group=tp_group)
                dim = param.partition_dim
                if _is_swiglu_fc1(gpt, name):
                    halves = [torch.chunk(p, 2, dim=dim) for p in parts]
                    tensor = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
                else:
                    tensor = torch.cat(parts, dim=dim)
            local[name_global] = tensor.cpu()
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    full: dict[str, torch.Tensor] = {}
    for part in gathered:
        for key, value in part.items():
            full.setdefault(key, value)
    return full
