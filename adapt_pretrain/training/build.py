"""Constructing a run's parts from its config: data (prepared on first use), loader, model, optimiser,
ADAPT engine, step engine and anchors. Nothing here decides *when* anything happens."""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

from adapt_pretrain.config import ConfigError, RunConfig
from adapt_pretrain.data.config import MANIFEST, check_data_dir
from adapt_pretrain.logs import get_logger
from adapt_pretrain.training.collective import barrier

log = get_logger(__name__)


@dataclass
class Parts:
    """What one rank trains with. `step_fn` owns the method; the trainer only calls it."""

    domains: list[str]
    tokenizer_path: str
    loader: Any          # DataStream for this data-parallel rank
    chunks: list         # megatron model chunks
    optimizer: Any
    scheduler: Any
    engine: Any          # AdaptEngine
    step_fn: Any         # TrainStep
    anchor_batches: list[dict]


def ensure_data(cfg: RunConfig, rank: int) -> Any:
    """Prepare the corpus into data.data_dir on first use (rank 0; others wait); return the DataConfig.

    Only when the config has a `prepare` section and the directory has no manifest yet, so a
    real pretraining corpus is never silently re-tokenised.
    """
    from adapt_pretrain.data.prepare import prepare

    if cfg.prepare is not None:
        manifest = os.path.join(cfg.prepare.out_dir, MANIFEST)
        if rank == 0 and not os.path.exists(manifest):
            log.info(f"preparing {len(cfg.prepare.inputs)} input(s) into {cfg.prepare.out_dir} (first use)")
            t0 = time.perf_counter()
            prepare(dataclasses.replace(cfg.prepare, overwrite=True))
            log.info(f"data prepared in {time.perf_counter() - t0:.1f}s")
        barrier()
    check_data_dir(cfg.data.data_dir)  # first use of the directory: a ConfigError naming data.data_dir
    return cfg.data


def build_parts(cfg: RunConfig, info: Any, num_microbatches: int) -> Parts:
    """Every part of the run on this rank, in the order the RNG and the data need (data, model, step)."""
    from adapt_pretrain.core.engine import AdaptEngine
    from adapt_pretrain.data.manifest import Manifest
    from adapt_pretrain.data.stream import DataStream
    from adapt_pretrain.megatron import TrainStep, build_model, build_optimizer

    data_cfg = ensure_data(cfg, info.rank)
    manifest = Manifest.load(data_cfg.data_dir)
    if manifest.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"vocabulary ({manifest.vocab_size}) in {data_cfg.data_dir}")
    domains = list(manifest.domains)
    loader = DataStream(data_cfg, dp_rank=info.dp_rank, dp_size=info.dp_size)
    chunks = build_model(cfg.model, cfg.parallel)
    optimizer, scheduler = build_optimizer(chunks, cfg.optim)
    engine = AdaptEngine(cfg.adapt)
    step_fn = TrainStep(chunks, optimizer, scheduler, engine, cfg.model, cfg.parallel, num_microbatches,
                        domains=domains)
    return Parts(domains=domains, tokenizer_path=manifest.tokenizer_path, loader=loader,
                 chunks=chunks, optimizer=optimizer, scheduler=scheduler, engine=engine, step_fn=step_fn,
                 anchor_batches=read_anchors(cfg, info, data_cfg.data_dir, step_fn))


def read_anchors(cfg: RunConfig, info: Any, data_dir: str, step_fn: Any) -> list[dict]:
    """This data-parallel rank's anchor batches, when the method asks for anchors at all."""
    if not step_fn.adapt.needs_anchors:
        return []
    from adapt_pretrain.data.anchors import anchor_batches

    return anchor_batches(data_dir, cfg.model.seq_len, cfg.train.micro_batch_size, info.dp_rank, info.dp_size,
                          num_anchors=cfg.adapt.num_anchors)

