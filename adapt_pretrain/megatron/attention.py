"""Core attention on `torch.nn.functional.scaled_dot_product_attention` for megatron's local spec.

megatron-core's local `DotProductAttention` materialises the [b, heads, s, s] scores (baddbmm,
masked softmax, bmm): memory and time quadratic in the sequence, which dominates a step at
s = 2048. `SDPAttention` is a drop-in `core_attention` submodule (same constructor and forward
signature as megatron-core 0.16.1's `DotProductAttention`) that hands the heads of this TP rank
to torch's SDPA, which picks the flash / cuDNN / memory-efficient kernel on GPU and the math
kernel on CPU. Grouped-query attention goes through SDPA's `enable_gqa` (no repeated K/V copy).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from torch import Tensor


class SDPAttention(MegatronModule):
    """Causal (or mask-driven) attention of this rank's heads: [s, b, np, hn] in, [s, b, np*hn] out.

    Unsupported megatron features (context parallelism, sliding windows, softmax offsets, packed
    sequences, attention bias) raise at construction or call instead of being silently ignored.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None) -> None:
        from megatron.core.transformer.utils import is_layer_window_attention
        from megatron.core.utils import divide

        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism (use model.attention=te)")
        if config.softmax_type != "vanilla":
            raise ValueError(f"SDPAttention supports softmax_type 'vanilla' only, got {config.softmax_type!r}")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise ValueError("SDPAttention does not support sliding-window attention")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        # megatron's query-key layer scaling divides the scale by layer_number and multiplies the
        # scores back inside its softmax: a no-op on the result, so only the plain scale matters
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type=None, attention_bias: Optional[Tensor] = None,
                packed_seq_params=None) -> Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn]; attention_mask (megatron convention:
        True = masked out) replaces the causal mask when given, as in DotProductAttention."""
        from megatron.core.transformer.enums import AttnMaskType

        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPAttention supports neither packed sequences nor an attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn] views
        causal = attention_mask is None and mask_type == AttnMaskType.causal and sq > 1
        mask = None if attention_mask is None else attention_mask.logical_not()
        dropout_p = self.dropout_p if self.training else 0.0
        with self._dropout_rng(dropout_p):
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=self.softmax_scale,
                enable_gqa=self.groups_per_partition != self.heads_per_partition)
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)  # [sq, b, np * hn]

    def _dropout_rng(self, dropout_p: float):
        """Megatron's model-parallel RNG region for dropout on TP-sharded heads (as
        DotProductAttention); a null context when there is no dropout."""
        if dropout_p == 0.0 or self.config.sequence_parallel:
            return contextlib.nullcontext()
        from megatron.core import tensor_parallel

        return tensor_parallel.get_cuda_rng_tracker().fork()
