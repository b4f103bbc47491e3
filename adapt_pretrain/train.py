"""`adapt-pretrain train` / `python -m adapt_pretrain.train`: the run harness.

Wires the parts together and owns the loop: launcher env -> process group -> megatron layout ->
data (prepared on first use) -> model/optimiser -> AdaptEngine -> steps with anchor refresh,
non-finite handling, metrics, checkpoints and resume. Every piece of maths lives elsewhere
(core/, megatron/, data/, monitor/); this file only decides *when* things happen, so the same
loop runs under the deepspeed launcher, torchrun, SLURM or as one plain process.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist

from adapt_pretrain.checkpoint import (CheckpointError, check_resume_compatible, find_checkpoint, read_meta, rng_state,
                                       same_layout, save_checkpoint, set_rng_state)
from adapt_pretrain.config import ConfigError
from adapt_pretrain.data.config import DataError
from adapt_pretrain.deepspeed.launcher import DistEnv, configure_threads, init_distributed, read_dist_env, strip_local_rank
from adapt_pretrain.run_config import RunConfig, load_run_config

CHECKPOINT_SUBDIR = "checkpoints"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient: training cannot recover by skipping."""


@dataclass
class LoopState:
    """Counters of the loop that a resume must restore (beyond model/optimiser/data/ADAPT state)."""

    step: int = 0               # next step to run (= steps completed)
    consumed_samples: int = 0   # sequences consumed over all data-parallel ranks
    nonfinite_in_row: int = 0
    skipped_steps: int = 0
    tokens: int = 0             # loss-carrying tokens seen (global)


@dataclass
class RunResult:
    """What a finished (or stopped) run returns to the CLI and to tests."""

    steps_run: int
    final_step: int
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    anchor_refresh_times: list[float] = field(default_factory=list)
    run_dir: str = ""


# ----- command line ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="adapt-pretrain train",
        description="Pretrain a megatron-core GPT with optional ADAPT reweighting (adapt.enabled=true).",
        epilog="Overrides: section.key=value, e.g. train.steps=20 adapt.enabled=false parallel.pipeline=2. "
               "Launch with `deepspeed --num_gpus N --module adapt_pretrain.train --config FILE`, torchrun, "
               "or as one process. See docs/TRAINING.md.")
    p.add_argument("--config", "-c", help="YAML file, or DeepSpeed-style JSON with an \"adapt\" section")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the newest checkpoint in <run_dir>/checkpoints (or from the given "
                        "checkpoint directory); a fresh start if none exists")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return p


# ----- data ------------------------------------------------------------------------------------------

def ensure_data(cfg: RunConfig, rank: int) -> Any:
    """Prepare the corpus into data.data_dir on first use (rank 0; others wait); return the DataConfig.

    Only when the config has a `prepare` section and the directory has no manifest yet, so a
    real pretraining corpus is never silently re-tokenised.
    """
    from adapt_pretrain.data.prepare import prepare

    if cfg.prepare is not None:
        manifest = os.path.join(cfg.prepare.out_dir, "manifest.json")
        if rank == 0 and not os.path.exists(manifest):
            print(f"[adapt-pretrain] preparing {len(cfg.prepare.inputs)} input(s) into {cfg.prepare.out_dir} "
                  "(first use)", flush=True)
            t0 = time.perf_counter()
            prepare(dataclasses.replace(cfg.prepare, overwrite=True))
            print(f"[adapt-pretrain] data prepared in {time.perf_counter() - t0:.1f}s", flush=True)
        _barrier()
    return cfg.data_config()


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----- trainer ---------------------------------------------------------------------------------------

class Trainer:
    """One training run on this rank. `run()` executes it; everything is built in `__init__`."""

    def __init__(self, cfg: RunConfig, env: DistEnv, resume: str | None = None, setup: bool = True) -> None:
        """setup=False reuses the megatron layout already set up (the benchmark builds two trainers)."""
        from adapt_pretrain.core.engine import AdaptEngine
        from adapt_pretrain.megatron import TrainStep, build_model, build_optimizer, parallel_info, setup_parallel

        self.cfg, self.env = cfg, env
        if setup:
            self.info = setup_parallel(cfg.parallel, cfg.train.seed)
        else:
            torch.manual_seed(cfg.train.seed)  # same initial weights as a fresh setup would give
            self.info = parallel_info()
        self._last_lr = 0.0
        self.layout = cfg.layout(self.info.world_size)
        self.num_microbatches = self.layout["num_microbatches"]
        self.run_dir = cfg.train.run_dir
        self.ckpt_root = os.path.join(self.run_dir, CHECKPOINT_SUBDIR)
        if self.info.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
        self.data_cfg = ensure_data(cfg, self.info.rank)
        self._check_vocab()
        self.loader = self._build_loader()
        self.anchor_batches = self._anchor_batches()
        self.chunks = build_model(cfg.model, cfg.parallel)
        self.optimizer, self.scheduler = build_optimizer(self.chunks, cfg.optim)
        self.engine = AdaptEngine(cfg.adapt)
        self.step_fn = TrainStep(self.chunks, self.optimizer, self.scheduler, self.engine, cfg.model, cfg.parallel,
                                 self.num_microbatches)
        self.state = LoopState()
        self.resumed_from: str | None = None
        if resume is not None:
            self._resume(resume)
        self.monitor = self._build_monitor()
        self.stats_layout = self._stats_layout()
        self._data_iter: Iterator[dict] | None = None

    # -- construction helpers ------------------------------------------------------------------------
    def _check_vocab(self) -> None:
        from adapt_pretrain.data.manifest import Manifest

        manifest = Manifest.load(self.data_cfg.data_dir)
        self.domains = list(manifest.domains)
        self.tokenizer_path = manifest.tokenizer_path
        if manifest.vocab_size > self.cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size={self.cfg.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary ({manifest.vocab_size}) in {self.data_cfg.data_dir}")

    def _build_loader(self) -> Any:
        from adapt_pretrain.data.stream import DataStream

        data_cfg = dataclasses.replace(self.data_cfg, dp_rank=self.info.dp_rank, dp_size=self.info.dp_size)
        return DataStream(data_cfg)

    def _anchor_batches(self) -> list[dict]:
        if not self.engine_needs_anchors():
            return []
        from adapt_pretrain.data.anchors import anchor_batches

        return anchor_batches(self.data_cfg.data_dir, self.cfg.model.seq_len, self.cfg.train.micro_batch_size,
                              self.info.dp_rank, self.info.dp_size, num_anchors=self.cfg.adapt.num_anchors)

    def engine_needs_anchors(self) -> bool:
        a = self.cfg.adapt
        return a.enabled and a.policy == "adapt" and a.signal == "embed"

    def _stats_layout(self) -> Any:
        from adapt_pretrain.monitor import StatsLayout

        a = self.cfg.adapt
        weight_hi = min(a.w_max, 1.0) if a.policy == "adapt" else max(a.w_max, 1.0)
        score_range = (-1.0, 1.0) if a.signal == "embed" else (-4.0, 4.0)
        return StatsLayout(num_domains=max(len(self.domains), 1), weight_range=(a.w_min, max(weight_hi, a.w_min + 1e-6)),
                           score_range=score_range)

    def _build_monitor(self) -> Any:
        from adapt_pretrain.monitor import Monitor

        # The logging rank holds the final results (last pipeline stage, TP rank 0, DP rank 0).
        rank = 0 if self.info.is_logging_rank else 1
        config = {**self.cfg.to_dict(), "layout": self.layout}
        return Monitor(self.run_dir, config, self.cfg.wandb, rank=rank, stdout=False)

    # -- checkpoints ----------------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "layout": self.layout, "domains": self.domains, "state": "sharded"}

    def _parts(self) -> Any:
        from adapt_pretrain.megatron.run_state import TrainerParts

        return TrainerParts(self.chunks, self.optimizer, self.scheduler, self.engine, self.loader, self.info)

    def _write_state(self, directory: str) -> list[str]:
        """Collective: this step's whole state into `directory` (see megatron/run_state.py)."""
        from adapt_pretrain.megatron.dist_ckpt import ShardedCheckpointer
        from adapt_pretrain.megatron.run_state import save_trainer_state

        if getattr(self, "_checkpointer", None) is None:
            self._checkpointer = ShardedCheckpointer()
        return save_trainer_state(directory, self._parts(), dataclasses.asdict(self.state), rng_state(),
                                  self._checkpointer)

    def save(self) -> str:
        from adapt_pretrain.megatron.run_state import checkpoint_files

        return save_checkpoint(self.ckpt_root, self.state.step, self._write_state, self._meta(), self.info.rank,
                               _barrier, keep=self.cfg.train.keep_checkpoints, all_ok=self._all_ok,
                               expected=checkpoint_files(self.info.world_size, self.info.dp_size))

    def _all_ok(self, ok: bool) -> bool:
        """True on every rank only if `ok` is True on every rank (a MIN all-reduce)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.info.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _resume(self, where: str) -> None:
        path = find_checkpoint(self.ckpt_root if where == "auto" else where)
        if path is None:
            if where != "auto":
                raise CheckpointError(f"--resume {where}: no checkpoint found there")
            if self.info.rank == 0:
                print(f"[adapt-pretrain] --resume: no checkpoint in {self.ckpt_root}; starting from step 0", flush=True)
            return
        meta = read_meta(path)
        self._require_sharded(path)
        check_resume_compatible(meta, self.cfg.to_dict(), self.layout)
        try:
            from adapt_pretrain.megatron.run_state import load_trainer_state

            restore_rng = same_layout(meta.get("layout", {}), self.layout)
            loop, rng = load_trainer_state(path, self._parts(), restore_rng)
            if rng is not None:
                set_rng_state(rng)
            elif self.info.rank == 0:
                print(f"[adapt-pretrain] resuming with another layout ({meta.get('layout')} -> {self.layout}): "
                      "model and optimiser resharded, data stream redistributed, RNG streams from the seed", flush=True)
            self.state = LoopState(**loop)
        except DataError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
            raise CheckpointError(f"cannot load {path}: it was written by an incompatible version of the trainer "
                                  f"or its parts ({type(exc).__name__}: {exc}). Start a new run_dir, or resume with "
                                  "the version that wrote it.") from exc
        self.resumed_from = path
        if self.info.rank == 0:
            print(f"[adapt-pretrain] resumed from {path} at step {self.state.step}", flush=True)

    @staticmethod
    def _require_sharded(path: str) -> None:
        from adapt_pretrain.megatron.dist_ckpt import is_sharded_checkpoint, sharded_dir

        if not is_sharded_checkpoint(sharded_dir(path)):
            raise CheckpointError(
                f"{path} is a legacy checkpoint (one rank_NNNNN.pt per rank, written before sharded checkpoints); "
                "this version resumes sharded checkpoints only. Resume it with the version that wrote it, or start a "
                "new run_dir; `adapt-pretrain eval` and `export` still read it if it was written with TP = PP = 1.")

    # -- the loop -------------------------------------------------------------------------------------
    def _next_micro_batches(self) -> list[dict]:
        batches = []
        while len(batches) < self.num_microbatches:
            if self._data_iter is None:
                self._data_iter = iter(self.loader)
            try:
                batches.append(next(self._data_iter))
            except StopIteration:  # finite mode: one iter() is one epoch; continue with the next
                self._data_iter = None
        return batches

    def _refresh_anchors(self, step: int) -> float:
        t0 = time.perf_counter()
        info = self.step_fn.refresh_anchors(step, self.anchor_batches) or {}
        elapsed = time.perf_counter() - t0
        fields = {k: v for k, v in info.items() if k != "step"}
        fields.setdefault("refresh_time_s", elapsed)
        self.monitor.log_event(step, "anchor_refresh", **fields)
        return elapsed

    def step_once(self) -> tuple[float, float, float]:
        """Run the next step (anchor refresh first when due), log it, update counters.

        Returns (loss, step seconds, anchor-refresh seconds). Used by `run` and by the benchmark,
        which interleaves two trainers step by step.
        """
        step = self.state.step
        refresh_s = 0.0
        if self.engine.needs_anchor_refresh(step):
            refresh_s = self._refresh_anchors(step)
        t0 = time.perf_counter()
        micro = self._next_micro_batches()
        self._last_micro = micro
        out = self.step_fn(step, micro)
        step_s = time.perf_counter() - t0
        loss = float(out.loss)
        self._handle_nonfinite(step, out, loss)
        self.state.step += 1
        self.state.consumed_samples += self.layout["dp"] * self.num_microbatches * self.cfg.train.micro_batch_size
        self.state.tokens += int(out.num_tokens or 0)
        self._log_step(step, out, loss, step_s, refresh_s)
        self._last_lr = float(out.lr)
        return loss, step_s, refresh_s

    def run(self) -> RunResult:
        cfg = self.cfg.train
        end = min(cfg.steps, cfg.stop_at_step or cfg.steps)
        result = RunResult(steps_run=0, final_step=self.state.step, run_dir=self.run_dir)
        bar = self._progress_bar(self.state.step, end)
        try:
            while self.state.step < end:
                loss, step_s, refresh_s = self.step_once()
                result.losses.append(loss)
                result.step_times.append(step_s + refresh_s)
                if refresh_s:
                    result.anchor_refresh_times.append(refresh_s)
                result.steps_run += 1
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self._last_lr:.2e}", refresh=False)
                    bar.update(1)
                if cfg.checkpoint_interval and self.state.step % cfg.checkpoint_interval == 0:
                    self.save()
            if self.state.step > 0 and not (cfg.checkpoint_interval and self.state.step % cfg.checkpoint_interval == 0):
                self.save()  # the final state, so the run can be evaluated or continued
        finally:
            if bar is not None:
                bar.close()
        result.final_step = self.state.step
        return result

    def _progress_bar(self, start: int, end: int) -> Any:
        if not (self.cfg.train.progress_bar and self.info.is_logging_rank):
            return None
        from tqdm import tqdm

        return tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)

    def _handle_nonfinite(self, step: int, out: Any, loss: float) -> None:
        bad = bool(out.skipped) or not math.isfinite(loss)
        if not bad:
            self.state.nonfinite_in_row = 0
            return
        self.state.nonfinite_in_row += 1
        self.state.skipped_steps += 1
        self.monitor.log_event(step, "nonfinite_step_skipped", loss=loss, in_row=self.state.nonfinite_in_row)
        if self.info.is_logging_rank:
            print(f"[adapt-pretrain] step {step}: non-finite loss/gradient ({loss}); update skipped "
                  f"({self.state.nonfinite_in_row} in a row)", file=sys.stderr, flush=True)
        limit = self.cfg.train.max_nonfinite_in_row
        if self.state.nonfinite_in_row >= limit:
            raise NonFiniteLossError(
                f"stopping at step {step}: {limit} consecutive steps had a non-finite loss or gradient "
                f"(train.max_nonfinite_in_row={limit}). Lower optim.lr, raise optim.warmup_steps, check the data, "
                f"or resume from the last checkpoint in {self.ckpt_root}.")

    def _log_step(self, step: int, out: Any, loss: float, step_s: float, refresh_s: float) -> None:
        from adapt_pretrain.monitor import finalize, partial_stats

        scalars: dict[str, float] = {
            "loss": loss, "lr": float(out.lr), "train/step_time_s": step_s, "train/anchor_refresh_s": refresh_s,
            "train/tokens_per_s": float(out.num_tokens or 0) / max(step_s, 1e-9),
            "train/skipped_steps": self.state.skipped_steps, "train/tokens": self.state.tokens,
            "train/consumed_samples": self.state.consumed_samples,
        }
        if out.grad_norm is not None and math.isfinite(float(out.grad_norm)):
            scalars["grad_norm"] = float(out.grad_norm)
        histograms, tables = {}, {}
        if out.groups is not None and self.info.is_logging_rank:  # the global batch's groups (last stage)
            g = out.groups
            stats = partial_stats(self.stats_layout, g["weights"], g["scores"], g["group_tokens"],
                                  g["group_domain"], g["group_loss_sum"])
            metrics = finalize(stats, self.domains)  # already global: gathered over DP by the step
            scalars.update(metrics.scalars)
            if self.monitor.histogram_due(step):
                histograms = metrics.histograms
            if self.monitor.table_due(step):
                tables = {"extreme_documents": self._extreme_rows(g)}
        scalars.update(self._data_stats())
        self.monitor.log_step(step, scalars, histograms or None, tables or None)
        if self.info.is_logging_rank and (step % self.cfg.train.log_interval == 0 or step + 1 == self.cfg.train.steps):
            line = " ".join(f"{k}={v:.4g}" for k, v in scalars.items()
                            if k in ("loss", "lr", "grad_norm", "train/tokens_per_s", "adapt/weight_mean",
                                     "adapt/weight_std"))
            message = f"[step {step}] {line}"
            if self.cfg.train.progress_bar:
                from tqdm import tqdm

                tqdm.write(message, file=sys.stderr)
            else:
                print(message, flush=True)

    def _data_stats(self) -> dict[str, float]:
        """The loader's counters (skipped samples by kind, micro-batches, tokens) summed over DP ranks.

        Collective over the data-parallel group: every rank calls it every step.
        """
        stats = self.loader.stats()
        keys = sorted(k for k in stats if k != "epoch")
        values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
        if self.info.dp_size > 1:
            from megatron.core import parallel_state as ps

            values = values.to(self.info.device)  # NCCL reduces device tensors only
            dist.all_reduce(values, group=ps.get_data_parallel_group())
        out = {f"data/{k}": float(v) for k, v in zip(keys, values.tolist())}
        out["data/epoch"] = float(stats.get("epoch", 0))
        return out

    def _extreme_rows(self, groups: dict[str, torch.Tensor], k: int = 5) -> list[dict[str, Any]]:
        """The k highest- and lowest-weighted documents of this step (a W&B/local table).

        Picked among the logging rank's own groups (its 1/DP share of the global batch, the first
        rows of the DP gather), whose tokens it holds, so every row carries a text snippet.
        """
        local = sum(int(mb["num_groups"]) for mb in self._last_micro)
        weights = groups["weights"].float()[:local]
        order = torch.argsort(weights, descending=True, stable=True).tolist()
        picks = order[:k] + [i for i in order[-k:] if i not in order[:k]]
        rows = []
        for i in picks:
            domain = int(groups["group_domain"][i])
            rows.append({"domain": self.domains[domain] if 0 <= domain < len(self.domains) else str(domain),
                         "doc_id": int(groups["group_doc_id"][i]), "weight": float(weights[i]),
                         "score": float(groups["scores"][i]), "tokens": float(groups["group_tokens"][i]),
                         "snippet": self._snippet(i)})
        return rows

    def _snippet(self, index: int, max_tokens: int = 24) -> str:
        """Decoded first tokens of the index-th local group (groups are numbered per micro-batch)."""
        for mb in self._last_micro:
            if index < int(mb["num_groups"]):
                ids = mb["tokens"].reshape(-1)[mb["group_id"].reshape(-1) == index][:max_tokens]
                return self._tokenizer().decode(ids.tolist()).replace("\n", " ").strip()
            index -= int(mb["num_groups"])
        return ""

    def _tokenizer(self) -> Any:
        if getattr(self, "_tok", None) is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(self.tokenizer_path)
        return self._tok

    def close(self) -> None:
        self.monitor.close()
        closer = getattr(self.loader, "close", None)
        if closer is not None:
            closer()


# ----- entry ----------------------------------------------------------------------------------------

def _quiet_known_warnings() -> None:
    """Megatron warns on import that Apex/Transformer Engine are absent (expected: it falls back to torch)."""
    import warnings

    for pattern in (".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
                    ".*full scope is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_known_warnings()
    argv, local_rank = strip_local_rank(argv)  # deepspeed appends --local_rank=N
    args = build_parser().parse_args(argv)
    if args.resume not in (None, "auto") and "=" in args.resume and not os.path.exists(args.resume):
        args.overrides.insert(0, args.resume)  # `--resume train.steps=9`: an override, not a path
        args.resume = "auto"
    env = read_dist_env(local_rank)
    configure_threads(env)
    try:
        cfg = load_run_config(args.config, args.overrides)
        cfg.layout(env.world_size)
    except ConfigError as exc:
        if env.rank == 0:
            print(f"adapt-pretrain train: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        if env.rank == 0:
            print(json.dumps(cfg.to_dict(), indent=2, default=str))
        return 0
    init_distributed(env)
    trainer = None
    try:
        trainer = Trainer(cfg, env, resume=args.resume)
        t0 = time.perf_counter()
        result = trainer.run()
        if trainer.info.is_logging_rank:
            print(f"[adapt-pretrain] done: {result.steps_run} steps in {time.perf_counter() - t0:.1f}s, "
                  f"final loss {result.losses[-1] if result.losses else float('nan'):.4f}, run dir {cfg.train.run_dir}",
                  flush=True)
        return 0
    except (ConfigError, CheckpointError, NonFiniteLossError, DataError) as exc:
        # every rank reaches the same verdict; one message is enough
        if env.rank == 0 or isinstance(exc, DataError):
            print(f"adapt-pretrain train (rank {env.rank}): {exc}", file=sys.stderr, flush=True)
        return 3
    finally:
        if trainer is not None:
            trainer.close()
        from adapt_pretrain.megatron import teardown_parallel

        teardown_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
