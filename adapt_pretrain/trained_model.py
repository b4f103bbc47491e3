"""A trained run's model in one process: loading it from a checkpoint of any layout, and forward-only
passes with it: per-token losses (eval) and document embeddings (the offline top-k baseline).

The model is rebuilt from the checkpoint's saved config with the step engine's `build_model`, so
eval sees exactly the network that was trained (same megatron code path, same CPU redirections).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch



@dataclass
class LoadedModel:
    gpt: torch.nn.Module
    seq_len: int
    config: dict[str, Any]  # the run's resolved config (RunConfig.to_dict form)
    step: int
    capture: Any            # HiddenCapture on the output layer

    @property
    def data_dir(self) -> str:
        return str(self.config["data"]["data_dir"])

    @property
    def device(self) -> torch.device:
        """Where the weights live (the GPU when there is one): inputs go there, results come back."""
        return next(self.gpt.parameters()).device


def load_checkpoint_gpt(ckpt: str) -> tuple[Any, dict[str, Any], torch.nn.Module]:
    """(ModelConfig, meta, GPTModel): the checkpoint's network rebuilt as TP = PP = 1 in this process,
    with its weights, whatever layout wrote it (sharded checkpoints are resharded on load; a legacy
    per-rank checkpoint is readable only if it was written with TP = PP = 1)."""
    from adapt_pretrain.checkpointing import load_rank_state, read_meta
    from adapt_pretrain.config import from_dict
    from adapt_pretrain.megatron.config import ModelConfig, ParallelConfig
    from adapt_pretrain.megatron.dist_ckpt import is_sharded_checkpoint, load_sharded, sharded_dir
    from adapt_pretrain.megatron.model import build_model, unwrap
    from adapt_pretrain.megatron.parallel import setup_parallel

    meta = read_meta(ckpt)
    model_cfg = from_dict(ModelConfig, meta["config"]["model"], "model")
    layout = meta.get("layout", {})
    sharded = is_sharded_checkpoint(sharded_dir(ckpt))
    if not sharded and (int(layout.get("tp", 1)) != 1 or int(layout.get("pp", 1)) != 1):
        raise ValueError(f"{ckpt} is a legacy per-rank checkpoint written with tensor={layout.get('tp')}, "
                         f"pipeline={layout.get('pp')}: only TP = PP = 1 ones can be read outside the trainer; "
                         "sharded checkpoints (written by this version) can be read from any layout")
    setup_parallel(ParallelConfig(), 0)
    chunks = build_model(model_cfg, ParallelConfig())
    gpt = unwrap(chunks[0])
    if sharded:
        load_sharded(sharded_dir(ckpt), chunks, load_optimizer=False)
    else:
        gpt.load_state_dict(load_rank_state(ckpt, 0)["step_fn"]["model"][0])
    gpt.eval()
    return model_cfg, meta, gpt


def load_run_model(run_dir: str) -> LoadedModel:
    """Rebuild the run's GPT in this process and load its final weights (eval mode, no grad)."""
    from adapt_pretrain.megatron.model import HiddenCapture

    from adapt_pretrain.checkpointing import find_run_checkpoint

    model_cfg, meta, gpt = load_checkpoint_gpt(find_run_checkpoint(run_dir))
    return LoadedModel(gpt, model_cfg.seq_len, meta["config"], int(meta.get("step", 0)), HiddenCapture.attach(gpt))


def pack_windows(stream: np.ndarray, labels: np.ndarray, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A token stream cut into [n, seq_len + 1] windows overlapping by one token (as training packs
    them: every label predicted once) and their [n, seq_len] label mask (`labels[j]` is the mask of
    stream[j + 1]). The last window is padded (mask 0) rather than dropped, so a small domain counts.
    """
    n_labels = max(len(stream) - 1, 0)
    if len(labels) != n_labels:
        raise ValueError(f"{len(labels)} label flags for a stream of {len(stream)} tokens (expected {n_labels})")
    n = max(1, -(-n_labels // seq_len))
    windows = np.full((n, seq_len + 1), pad_id, dtype=np.int64)
    mask = np.zeros((n, seq_len), dtype=np.float32)
    for i in range(n):
        part = stream[i * seq_len: i * seq_len + seq_len + 1]
        windows[i, : len(part)] = part
        flags = labels[i * seq_len: i * seq_len + seq_len]
        mask[i, : len(flags)] = flags
    return windows, mask


@torch.no_grad()
def token_losses(model: LoadedModel, windows: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Per-label cross-entropy [n, seq_len] of [n, seq_len + 1] windows (nats)."""
    out = []
    s = model.seq_len
    for i in range(0, len(windows), batch_size):
        w = torch.from_numpy(windows[i: i + batch_size]).to(model.device)
        tokens, labels = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        pos = torch.arange(s, device=model.device).unsqueeze(0).expand(tokens.shape[0], s)
        logits = model.gpt(tokens, pos, None)
        model.capture.pop()
        if logits.shape[0] != tokens.shape[0]:  # [s, b, V] layout
            logits = logits.transpose(0, 1)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 reduction="none")
        out.append(loss.reshape(tokens.shape).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, s), np.float32)


@torch.no_grad()
def document_embeddings(model: LoadedModel, docs: Sequence[np.ndarray], batch_size: int = 32,
                        progress: bool = False, max_tokens: int | None = None) -> np.ndarray:
    """Position-weighted pooled final hidden states of each document's first tokens [N, H]
    (core/pooling.py's group embedding, one group per document; not normalised). At most
    `max_tokens` (default and cap: seq_len) tokens per document are embedded."""
    from tqdm import tqdm

    s = min(max_tokens or model.seq_len, model.seq_len)
    chunks: list[np.ndarray] = []
    for i in tqdm(range(0, len(docs), batch_size), desc="embedding documents", disable=not progress):
        batch = docs[i: i + batch_size]
        tokens = torch.zeros(len(batch), s, dtype=torch.int64)
        weight = torch.zeros(len(batch), s, dtype=torch.float32)
        for j, d in enumerate(batch):
            d = np.asarray(d[:s], dtype=np.int64)
            tokens[j, : len(d)] = torch.from_numpy(d)
            weight[j, : len(d)] = torch.arange(1, len(d) + 1, dtype=torch.float32)
        pos = torch.arange(s, device=model.device).unsqueeze(0).expand(len(batch), s)
        model.gpt(tokens.to(model.device), pos, None)
        hidden = model.capture.pop().float()
        if hidden.shape[0] != len(batch) or hidden.shape[1] != s:  # megatron's [s, b, H]
            hidden = hidden.transpose(0, 1)
        chunks.append(torch.einsum("bs,bsh->bh", weight.to(hidden.device), hidden).cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
