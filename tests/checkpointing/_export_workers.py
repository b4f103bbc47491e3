"""Worker side of the export test: a tiny Llama-style GPT saved under TP 2, and its export."""
from __future__ import annotations

import dataclasses
import json
import os

import torch

VARIANTS = {
    # production-like: grouped-query attention, tied embeddings, no biases
    "gqa_tied": dict(num_query_groups=2, tie_embeddings=True, add_bias_linear=False),
    # every other tensor kind Llama can hold: untied output layer, attention and MLP biases
    "mha_untied_bias": dict(num_query_groups=None, tie_embeddings=False, add_bias_linear=True),
}
VOCAB, SEQ = 1024, 32


def model_cfg(variant: str):
    from adapt_pretrain.megatron import ModelConfig

    return ModelConfig(vocab_size=VOCAB, seq_len=SEQ, hidden_size=32, num_layers=2, num_attention_heads=4,
                       ffn_hidden_size=48, activation="swiglu", normalization="RMSNorm", position_embedding="rope",
                       bf16=False, **VARIANTS[variant])


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))


def _perturbed(full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor moved away from its initial value (norm weights are all ones at init, biases
    zeros): a tensor mapped to the wrong place or split wrongly then changes the logits."""
    g = torch.Generator().manual_seed(11)
    return {k: v + (0.3 if v.dim() == 1 else 0.05) * torch.randn(v.shape, generator=g) for k, v in full.items()}


def save_under_tp2(rank: int, world_size: int, root: str, data_dir: str) -> dict | None:
    """For each variant: build under TP 2, perturb, record the megatron logits (vocab shards gathered),
    and write a sharded checkpoint laid out like the trainer's (run/checkpoints/step_000001)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from adapt_pretrain.megatron import ParallelConfig, build_model, setup_parallel, teardown_parallel
    from adapt_pretrain.megatron.dist_ckpt import ShardedCheckpointer, sharded_dir
    from adapt_pretrain.megatron.model import unwrap
    from adapt_pretrain.megatron.optim import build_optimizer
    from adapt_pretrain.megatron.reshard import gather_full_state_dict, load_full_state_dict
    from tests.distributed._layouts import optim_cfg

    out = {}
    for variant in VARIANTS:
        parallel = ParallelConfig(tensor=2)
        setup_parallel(parallel, 7)
        model = model_cfg(variant)
        chunks = build_model(model, parallel)
        load_full_state_dict(chunks, _perturbed(gather_full_state_dict(chunks)))
        gpt = unwrap(chunks[0]).eval()
        x = tokens()
        with torch.no_grad():
            local = gpt(x, torch.arange(SEQ).unsqueeze(0).expand_as(x), None)
        parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        optimizer, scheduler = build_optimizer(chunks, optim_cfg())
        ckpt = os.path.join(root, variant, "checkpoints", "step_000001")
        ShardedCheckpointer().save(sharded_dir(ckpt), chunks, optimizer, scheduler)
        if rank == 0:
            meta = {"step": 1, "format": 2, "layout": {"world_size": 2, "tp": 2, "pp": 1, "dp": 1},
                    "config": {"model": dataclasses.asdict(model), "data": {"data_dir": data_dir}}}
            with open(os.path.join(ckpt, "meta.json"), "w", encoding="utf-8") as fh:
                json.dump(meta, fh)
            # the manifest the trainer writes last (rank 0 owns the sharded files; readers verify it)
            from adapt_pretrain.checkpointing import describe_files, write_manifest

            model_files = [f"model/{n}" for n in sorted(os.listdir(sharded_dir(ckpt)))]
            write_manifest(ckpt, 1, describe_files(ckpt, [*model_files, "meta.json"], rank=0))
            with open(os.path.join(root, variant, "checkpoints", "latest"), "w", encoding="utf-8") as fh:
                fh.write("step_000001")
            out[variant] = torch.cat(parts, dim=-1).clone()
        teardown_parallel()
    return out if rank == 0 else None


def eval_windows() -> torch.Tensor:
    """[2, SEQ + 1] windows whose inputs are `tokens()` (the eval path predicts column t + 1 from t)."""
    x = tokens()
    return torch.cat([x, x[:, :1]], dim=1)


def export_and_evaluate(rank: int, world_size: int, root: str) -> dict:
    """Export every variant, and compute `adapt-pretrain eval`'s per-token losses from its checkpoint."""
    from adapt_pretrain.checkpointing import find_run_checkpoint
    from adapt_pretrain.export import export_checkpoint
    from adapt_pretrain.trained_model import load_run_model, token_losses

    out = {}
    for v in VARIANTS:
        summary = export_checkpoint(find_run_checkpoint(os.path.join(root, v)), os.path.join(root, v, "hf"))
        losses = token_losses(load_run_model(os.path.join(root, v)), eval_windows().numpy())
        out[v] = {"summary": summary, "eval_losses": torch.from_numpy(losses)}
    return out
