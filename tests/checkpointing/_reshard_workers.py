"""Worker side of the resharding tests (module-level so spawned processes can import it).

Jobs run one after another in one spawned process group (setup -> job -> teardown of megatron's
groups), each returning plain tensors on rank 0:
  train_save:  layout A, ADAPT steps 0..1 from `init`, then a sharded checkpoint into `directory`
  reference:   layout B, ADAPT steps 0..3 uninterrupted (Adam moments also recorded after step 1)
  resume:      layout B, load `directory`, then steps 2..3
  async_save:  an asynchronous save of the fresh model into `directory` and a load back (test_dist_ckpt)
Batches and ADAPT settings are the layout tests' (tests/distributed/_layouts.py): standardised
weights and an anchor refresh at step 2, which after a resume re-estimates the statistics from the
unit embeddings the checkpoint carried over. Models: the layout tests' GPT (`gpt`: LayerNorm, GELU,
learned positions, biases) and a Llama-style one (`llama`: RMSNorm, SwiGLU, RoPE, no biases, 2
query groups for 4 heads), whose fused QKV and [gate; up] tensors are the ones that resharding
must split per query group / per half.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from tests.distributed._layouts import (GLOBAL_MICROBATCHES, HEADS, HIDDEN, LAYERS, SEED, SEQ, VOCAB, _shard,
                                        adapt_cfg, anchor_batches, decode, encode, global_batches, optim_cfg)

SAVE_AT = 2
TOTAL = 4


def gather_adam(chunks: list, optimizer: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Adam's exp_avg / exp_avg_sq as full single-process tensors (TP shards concatenated by the
    layout tests' parameter mapping, not by dist_checkpointing), plus the step count."""
    from adapt_pretrain.megatron.optim import _inner_optimizers
    from adapt_pretrain.megatron.reshard import gather_full_state_dict

    states: dict[int, dict] = {}
    for inner in _inner_optimizers(optimizer):
        for param, state in inner.optimizer.state.items():
            states[id(param)] = state
    steps = set()
    params = [p for c in chunks for p in c.parameters()]
    for p in params:
        state = states.get(id(p), {})
        p._test_exp_avg = state.get("exp_avg", torch.zeros_like(p))
        p._test_exp_avg_sq = state.get("exp_avg_sq", torch.zeros_like(p))
        if "step" in state:
            steps.add(float(state["step"]))
    out = {"exp_avg": gather_full_state_dict(chunks, attr="_test_exp_avg"),
           "exp_avg_sq": gather_full_state_dict(chunks, attr="_test_exp_avg_sq"), "steps": sorted(steps)}
    for p in params:
        del p._test_exp_avg, p._test_exp_avg_sq
    return out


def model_cfg(kind: str):
    from adapt_pretrain.megatron import ModelConfig

    if kind == "gpt":
        return ModelConfig(vocab_size=VOCAB, seq_len=SEQ, hidden_size=HIDDEN, num_layers=LAYERS, num_attention_heads=HEADS)
    if kind == "llama":
        # megatron's local attention: the bound of test_reshard was measured with it. With the SDPA core
        # attention (the CPU default) two steps under TP 2 and under PP 2 x DP 2 already differ by 1.1e-3 lr
        # in one entry before any checkpoint is involved (float rounding amplified by Adam), just over the
        # 1e-3 lr bound; the checkpoint's content does not depend on the attention implementation.
        return ModelConfig(vocab_size=VOCAB, seq_len=SEQ, hidden_size=HIDDEN, num_layers=LAYERS, num_attention_heads=HEADS,
                           num_query_groups=2, ffn_hidden_size=48, activation="swiglu", normalization="RMSNorm",
                           position_embedding="rope", add_bias_linear=False, attention="local")
    raise ValueError(kind)


def _build(layout: dict, kind: str, init: Optional[dict]):
    from adapt_pretrain.megatron import ParallelConfig, build_model, setup_parallel
    from adapt_pretrain.megatron.reshard import load_full_state_dict

    parallel = ParallelConfig(tensor=layout.get("tp", 1), pipeline=layout.get("pp", 1))
    info = setup_parallel(parallel, SEED)
    model = model_cfg(kind)
    chunks = build_model(model, parallel)
    if init is not None:
        load_full_state_dict(chunks, init)
    return info, parallel, model, chunks


class _Run:
    """One layout's model, optimiser, ADAPT engine and step function."""

    def __init__(self, layout: dict, kind: str, init: Optional[dict]) -> None:
        from adapt_pretrain.core import AdaptEngine
        from adapt_pretrain.megatron import TrainStep, build_optimizer

        self.info, self.parallel, self.model, self.chunks = _build(layout, kind, init)
        self.optimizer, self.scheduler = build_optimizer(self.chunks, optim_cfg())
        self.engine = AdaptEngine(adapt_cfg(True, True))
        self.step_fn = TrainStep(self.chunks, self.optimizer, self.scheduler, self.engine, self.model, self.parallel,
                                 GLOBAL_MICROBATCHES // self.info.dp_size)

    def steps(self, first: int, last: int) -> list[float]:
        info, losses = self.info, []
        for step in range(first, last):
            if self.engine.needs_anchor_refresh(step):
                self.step_fn.refresh_anchors(step, _shard(anchor_batches(), info.dp_rank, info.dp_size, contiguous=False))
            losses.append(self.step_fn(step, _shard(global_batches(step), info.dp_rank, info.dp_size)).loss)
        return losses

    def save(self, directory: str) -> None:
        from adapt_pretrain.megatron.dist_ckpt import ShardedCheckpointer
        from adapt_pretrain.megatron.run_state import save_engine

        ShardedCheckpointer().save(os.path.join(directory, "model"), self.chunks, self.optimizer, self.scheduler)
        run_dir = os.path.join(directory, "run")
        os.makedirs(run_dir, exist_ok=True)
        i = self.info
        save_engine(run_dir, self.engine, i.rank, i.dp_rank, i.tp_rank, i.is_last_stage)
        torch.distributed.barrier()

    def load(self, directory: str, load_optimizer: bool = True) -> None:
        from adapt_pretrain.megatron.dist_ckpt import load_sharded
        from adapt_pretrain.megatron.run_state import load_engine

        load_sharded(os.path.join(directory, "model"), self.chunks, self.optimizer, self.scheduler,
                     load_optimizer=load_optimizer)
        load_engine(os.path.join(directory, "run"), self.engine, self.info.dp_rank, self.info.dp_size,
                    self.info.is_last_stage)

    def snapshot(self) -> dict[str, Any]:
        from adapt_pretrain.megatron.reshard import gather_full_state_dict

        return {"params": gather_full_state_dict(self.chunks), "adam": gather_adam(self.chunks, self.optimizer),
                "lr": float(self.optimizer.param_groups[0]["lr"]), "scheduler_steps": int(self.scheduler.num_steps)}


def run_jobs(rank: int, world_size: int, jobs: list[dict], inits: Optional[bytes]) -> Optional[bytes]:
    """Run `jobs` (see module docstring) in order. `inits`: initial full weights per model kind; the
    first job of a kind without one makes it from its own weights (returned as "init")."""
    from adapt_pretrain.megatron import teardown_parallel
    from adapt_pretrain.megatron.reshard import gather_full_state_dict

    full_inits: dict[str, dict] = decode(inits) if inits is not None else {}
    results = []
    for job in jobs:
        kind = job.get("model", "gpt")
        run = _Run(job["layout"], kind, full_inits.get(kind))
        res: dict[str, Any] = {"job": job}
        if kind not in full_inits:
            full_inits[kind] = gather_full_state_dict(run.chunks)
            res["init"] = full_inits[kind]
        if job["kind"] == "train_save":
            res["loss"] = run.steps(0, SAVE_AT)
            run.save(job["directory"])
        elif job["kind"] == "reference":
            res["loss"] = run.steps(0, SAVE_AT)
            res["at_save"] = run.snapshot()
            res["loss"] += run.steps(SAVE_AT, TOTAL)
            res["end"] = run.snapshot()
        elif job["kind"] == "async_save":
            from tests.checkpointing._dist_ckpt_workers import async_save_then_load

            res.update(async_save_then_load(run.chunks, run.optimizer, run.scheduler, job["directory"]))
        elif job["kind"] == "resume":
            run.load(job["directory"], load_optimizer=job.get("load_optimizer", True))
            res["at_save"] = run.snapshot()
            res["loss"] = run.steps(SAVE_AT, TOTAL)
            res["end"] = run.snapshot()
        else:
            raise ValueError(f"unknown job {job['kind']!r}")
        teardown_parallel()
        results.append(res)
    return encode(results) if rank == 0 else None
