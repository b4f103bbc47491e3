"""ADAPT in a plain DeepSpeed loop around a Hugging Face Llama, any ZeRO stage, fed by the streaming loader.

    adapt-pretrain prepare --demo --out data/demo --vocab-size 2048 --anchor-domains python_doc --num-anchors 16
    deepspeed --num_gpus 2 launch/examples/deepspeed_hf.py --zero-stage 3 --data-dir data/demo --steps 20

Everything except the lines marked `# ADAPT` is what a DeepSpeed user's loop already has: a model,
a DeepSpeed config, `deepspeed.initialize`, forward / backward / step per micro-batch. The model is
a small Llama built from a local config (nothing is downloaded); its vocabulary is the prepared
data's tokenizer (read from the data's manifest). Metrics go to <run-dir>/metrics.jsonl and a W&B
run (offline unless WANDB_API_KEY or WANDB_MODE say otherwise); the final state to
<run-dir>/checkpoint (`engine.save_checkpoint`, ADAPT's state in its client_state).
A DeepSpeed JSON file given with --config is used as is; its "adapt" section (if any) is ADAPT's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="a directory written by `adapt-pretrain prepare`")
    p.add_argument("--run-dir", default="runs/deepspeed-hf", help="where metrics.jsonl, W&B and the checkpoint go")
    p.add_argument("--steps", type=int, default=20, help="optimiser steps")
    p.add_argument("--config", help="DeepSpeed JSON; replaces the config built from the flags below")
    p.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per micro-batch and rank")
    p.add_argument("--grad-accum", type=int, default=2, help="gradient accumulation steps")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--bf16", action="store_true", help="bf16 training (needs ZeRO stage >= 1 with ADAPT on)")
    p.add_argument("--hidden-size", type=int, default=64, help="hidden size of the Llama")
    p.add_argument("--layers", type=int, default=2, help="transformer layers of the Llama")
    p.add_argument("--heads", type=int, default=4, help="attention heads of the Llama")
    p.add_argument("--adapt", nargs="*", default=[], metavar="KEY=VALUE",
                   help="keys of the `adapt` section, on top of --config's section or, without --config, of "
                        "enabled=true refresh_interval=10; `--adapt enabled=false` is plain DeepSpeed training")
    p.add_argument("--seed", type=int, default=1234, help="seed of the model's initial weights")
    return p


def deepspeed_config(args: argparse.Namespace, world: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(DeepSpeed config, adapt section): from --config, else from the flags."""
    import yaml

    if args.config:
        with open(args.config, encoding="utf-8") as f:
            config = json.load(f)
        adapt = config.pop("adapt", {})
    else:
        config = {"train_micro_batch_size_per_gpu": args.micro_batch_size,
                  "gradient_accumulation_steps": args.grad_accum,
                  "train_batch_size": args.micro_batch_size * args.grad_accum * world,
                  "optimizer": {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": 0.1, "torch_adam": True}},
                  "gradient_clipping": 1.0, "zero_optimization": {"stage": args.zero_stage},
                  "bf16": {"enabled": args.bf16}, "steps_per_print": 10 ** 9}
        adapt = {"enabled": True, "refresh_interval": 10}
    for item in args.adapt:  # values parsed as YAML scalars: true, 0.5, 10
        key, _, value = item.partition("=")
        adapt[key] = yaml.safe_load(value)
    return config, adapt


def build_model(vocab_size: int, args: argparse.Namespace) -> torch.nn.Module:
    """A small Llama from a local config (no hub download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=args.seq_len,
                         tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> int:
    import deepspeed

    from adapt_pretrain.data.anchors import anchor_batches
    from adapt_pretrain.data.config import DataConfig
    from adapt_pretrain.data.manifest import Manifest
    from adapt_pretrain.data.stream import DataStream
    from adapt_pretrain.deepspeed import DeepSpeedAdapt, configure_threads, init_distributed, read_dist_env, strip_local_rank
    from adapt_pretrain.monitor import Monitor, WandbConfig

    rest, local_rank = strip_local_rank(list(sys.argv[1:] if argv is None else argv))  # deepspeed adds --local_rank
    args = build_parser().parse_args(rest)
    env = read_dist_env(local_rank)
    configure_threads(env)
    init_distributed(env)  # NCCL on GPUs, gloo on CPU; deepspeed.initialize then uses this group
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))  # deepspeed wants it; a plain `python` run lacks it
    world = torch.distributed.get_world_size()

    manifest = Manifest.load(args.data_dir)
    model = build_model(manifest.vocab_size, args)
    ds_config, adapt_section = deepspeed_config(args, world)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    adapt = DeepSpeedAdapt(engine, adapt_section, domains=manifest.domains)                        # ADAPT

    micro = engine.train_micro_batch_size_per_gpu()
    stream = DataStream(DataConfig(data_dir=args.data_dir, seq_len=args.seq_len, micro_batch_size=micro,
                                   num_workers=1, seed=args.seed))  # this rank's shard of the stream
    anchors = (anchor_batches(args.data_dir, args.seq_len, micro, num_anchors=adapt.cfg.num_anchors)    # ADAPT
               if adapt.core.uses_hidden_states else [])
    monitor = Monitor(args.run_dir, {"deepspeed": ds_config, "adapt": adapt_section, "args": vars(args)},
                      WandbConfig(project="adapt-pretrain-deepspeed", histogram_interval=5), rank=env.rank,
                      stdout=False)
    batches = iter(stream)
    while engine.global_steps < args.steps:
        if adapt.needs_anchor_refresh():                                                           # ADAPT
            monitor.log_event(adapt.step_index, "anchor_refresh", **adapt.refresh_anchors(anchors))
        batch = {k: v.to(engine.device) if torch.is_tensor(v) else v for k, v in next(batches).items()}
        logits = engine(input_ids=batch["tokens"]).logits
        adapt.backward(adapt.loss(batch, logits))                     # ADAPT: instead of engine.backward(loss)
        result = adapt.step()                                         # ADAPT: instead of engine.step()
        if result is not None:
            adapt.log(monitor, result)                                                             # ADAPT
            if env.rank == 0:
                print(f"[step {result.step}] loss={result.loss:.4f} grad_norm={result.grad_norm:.3g} "
                      f"lr={result.lr:.2e}", flush=True)
    engine.save_checkpoint(os.path.join(args.run_dir, "checkpoint"),
                           client_state={"adapt": adapt.state_dict()})                             # ADAPT
    monitor.close()
    stream_close = getattr(stream, "close", None)
    if stream_close is not None:
        stream_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
