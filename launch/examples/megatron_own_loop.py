"""ADAPT in a plain megatron-core training loop (no adapt-pretrain Trainer).

The loop is megatron-core's own: GPTModel chunks in megatron's DistributedDataParallel,
`get_forward_backward_func()`, megatron's optimizer and LR scheduler. ADAPT enters through
`AdaptMegatron` only (the lines marked `# ADAPT`; docs/PLUGIN.md, "Megatron-core"). The model and
optimizer come from `adapt_pretrain.megatron.build_model` / `build_optimizer` for brevity; any
GPTModel built with `calculate_per_token_loss=True` works the same way.

    python launch/examples/megatron_own_loop.py --config launch/configs/demo-cpu.yaml train.steps=20
    torchrun --nproc_per_node 2 launch/examples/megatron_own_loop.py --config launch/configs/demo-cpu.yaml

Takes the trainer's YAML config and `section.key=value` overrides (model, optim, train, data and the
`adapt` section); writes <train.run_dir>/metrics.jsonl (+ a W&B run when wandb.enabled).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Iterator

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func

from adapt_pretrain.config import load_run_config
from adapt_pretrain.data.anchors import anchor_batches
from adapt_pretrain.data.manifest import Manifest
from adapt_pretrain.data.prepare import prepare
from adapt_pretrain.data.stream import DataStream
from adapt_pretrain.layout import Layout
from adapt_pretrain.megatron import AdaptMegatron, build_model, build_optimizer, setup_parallel, teardown_parallel
from adapt_pretrain.monitor import Monitor


def prepared_data(cfg: Any, rank: int) -> Any:
    """The config's DataConfig; tokenises the `prepare` inputs on first use (rank 0, others wait)."""
    if cfg.prepare is not None and not os.path.exists(os.path.join(cfg.prepare.out_dir, "manifest.json")):
        if rank == 0:
            prepare(dataclasses.replace(cfg.prepare, overwrite=True))
        if dist.is_initialized():
            dist.barrier()
    return cfg.data


def forever(stream: DataStream) -> Iterator[dict]:
    while True:  # one iter() is one epoch
        yield from stream


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", "-c", required=True, help="the run config (YAML), as for `adapt-pretrain train`")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser


def main(argv: list[str] | None = None) -> list[float]:
    args = build_parser().parse_args(argv)
    cfg = load_run_config(args.config, args.overrides)

    info = setup_parallel(cfg.parallel, cfg.train.seed)
    num_micro = Layout.plan(cfg.parallel, cfg.train, info.world_size).num_microbatches
    data_cfg = prepared_data(cfg, info.rank)
    domains = Manifest.load(data_cfg.data_dir).domains
    stream = forever(DataStream(data_cfg, dp_rank=info.dp_rank, dp_size=info.dp_size))
    chunks = build_model(cfg.model, cfg.parallel)
    optimizer, scheduler = build_optimizer(chunks, cfg.optim)
    forward_backward = get_forward_backward_func()

    adapt = AdaptMegatron(chunks, cfg.adapt, num_micro, domains=domains)                 # ADAPT
    adapt.config.finalize_model_grads_func = adapt.finalize_model_grads                 # ADAPT
    anchors = anchor_batches(data_cfg.data_dir, cfg.model.seq_len, cfg.train.micro_batch_size, info.dp_rank,
                             info.dp_size, num_anchors=cfg.adapt.num_anchors) \
        if adapt.needs_anchors else []                                           # ADAPT
    monitor = Monitor(cfg.train.run_dir, cfg.to_dict(), cfg.wandb, rank=0 if info.is_logging_rank else 1,
                      stdout=False)

    losses = []
    for step in range(cfg.train.steps):
        if adapt.needs_anchor_refresh(step):                                            # ADAPT
            monitor.log_event(step, "anchor_refresh", **adapt.refresh_anchors(step, anchors, forward_backward))
        micro_batches = [next(stream) for _ in range(num_micro)]
        adapt.begin_step(step)                                                          # ADAPT
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(forward_step_func=adapt.forward_step_func,                     # ADAPT
                         data_iterator=[iter(micro_batches) for _ in chunks] if len(chunks) > 1
                         else iter(micro_batches), model=chunks, num_microbatches=num_micro,
                         seq_length=cfg.model.seq_len, micro_batch_size=cfg.train.micro_batch_size)
        update_ok, grad_norm, _ = optimizer.step()
        if update_ok:
            scheduler.step(increment=1)
        totals = adapt.end_step()                                                       # ADAPT
        metrics = adapt.step_metrics()                                                  # ADAPT
        scalars = {"loss": totals.loss, "grad_norm": float(grad_norm or float("nan"))}
        if metrics is not None and info.is_logging_rank:
            scalars.update(metrics.scalars)                                             # ADAPT
        monitor.log_step(step, scalars)
        losses.append(totals.loss)
        if info.is_logging_rank:
            print(f"[step {step}] loss={totals.loss:.6f} weight_mean={scalars.get('adapt/weight_mean', 1.0):.4f}",
                  flush=True)
    monitor.close()
    teardown_parallel()
    return losses


if __name__ == "__main__":
    main()
