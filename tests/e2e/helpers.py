"""Helpers of the end-to-end tests: start real training processes and read what they wrote."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def env() -> dict[str, str]:
    out = dict(os.environ)
    out.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return out


def run(cmd: list[str], timeout: float = 240.0, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def train_plain(args: list[str], **kw) -> subprocess.CompletedProcess:
    """One plain process (no launcher)."""
    return run([PYTHON, "-m", "adapt_pretrain.train", *args], **kw)


def train_torchrun(nproc: int, args: list[str], **kw) -> subprocess.CompletedProcess:
    return run([PYTHON, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
                "-m", "adapt_pretrain.train", *args], **kw)


def train_deepspeed(launcher_args: list[str], args: list[str], **kw) -> subprocess.CompletedProcess:
    return run([DEEPSPEED, *launcher_args, "--module", "adapt_pretrain.train", *args], **kw)


def losses(run_dir: str) -> dict[int, float]:
    from adapt_pretrain.monitor import read_metrics

    steps, _ = read_metrics(run_dir)
    return {s: line["scalars"]["loss"] for s, line in steps.items()}


def events(run_dir: str, name: str) -> list[dict]:
    from adapt_pretrain.monitor import read_metrics

    return [e for e in read_metrics(run_dir)[1] if e["event"] == name]


def model_state(run_dir: str, step: int) -> list[dict[str, torch.Tensor]]:
    """The model tensors of a sharded checkpoint, as full tensors by their sharded names (torch's own
    reader of the torch_dist format, no megatron code)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    sharded = os.path.join(run_dir, "checkpoints", f"step_{step:06d}", "model")
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(sharded, os.path.join(tmp, "plain.pt"))
        state = torch.load(os.path.join(tmp, "plain.pt"), map_location="cpu", weights_only=False)
    return [{k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")}]


def assert_same_params(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for chunk_a, chunk_b in zip(a, b):
        keys = [k for k, v in chunk_a.items() if isinstance(v, torch.Tensor)]
        assert keys and keys == [k for k, v in chunk_b.items() if isinstance(v, torch.Tensor)]
        for key in keys:
            assert torch.equal(chunk_a[key], chunk_b[key]), key


# ----- fault injection on real files --------------------------------------------------------------

def flip_byte(path: str, offset: int | None = None) -> None:
    """Invert one byte in the middle of a file (silent corruption: same size, still a valid zip for torch)."""
    with open(path, "r+b") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(size // 2 if offset is None else offset)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))


def truncate(path: str, keep: float = 0.5) -> None:
    """Cut a file to a fraction of its size (a full disk or an interrupted copy)."""
    os.truncate(path, int(os.path.getsize(path) * keep))


def snapshot(directory: str) -> dict[str, str]:
    """relative path -> sha256 of every file under `directory` (to prove nothing was changed)."""
    import hashlib

    out = {}
    for base, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, directory)] = hashlib.sha256(fh.read()).hexdigest()
    return out
