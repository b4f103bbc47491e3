"""`adapt-pretrain export`: a checkpoint saved under TP 2 becomes a Hugging Face LlamaForCausalLM whose
logits (loaded with transformers on CPU) equal the megatron forward on the same tokens within 1e-4.

transformers shares no code with the export: it reads only the written safetensors and config.json.
The megatron reference is the TP 2 model's own forward (vocab shards gathered), before saving.
"""
from __future__ import annotations

import os

import pytest
import torch

from adapt_pretrain.export import ExportError, unsupported_options
from tests.checkpointing._export_workers import (VARIANTS, eval_windows, export_and_evaluate, model_cfg, save_under_tp2,
                                              tokens)
from tests.distributed_helper import run_distributed

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, prepared):
    root = str(tmp_path_factory.mktemp("export"))
    logits = run_distributed(save_under_tp2, 2, root, prepared, timeout=600)[0]
    results = run_distributed(export_and_evaluate, 1, root, timeout=600)[0]
    return root, logits, results


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_logits_equal_megatron_forward(exported, variant):
    root, logits, results = exported
    out = os.path.join(root, variant, "hf")
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir(out))
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(tokens()).logits
    want = logits[variant]
    assert got.shape == want.shape
    diff = float((got - want).abs().max())
    assert diff < 1e-4, f"{variant}: max |logit difference| {diff:.2e}"
    assert float(want.std()) > 0.1  # the comparison is not between near-constant logits
    assert results[variant]["summary"]["layout"]["tp"] == 2


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_eval_reads_a_tp2_checkpoint(exported, variant):
    """`adapt-pretrain eval`'s model loading (one process, TP 1) on the TP 2 checkpoint: its per-token
    losses equal cross-entropy of the TP 2 model's own logits."""
    root, logits, results = exported
    labels = eval_windows()[:, 1:]
    want = torch.nn.functional.cross_entropy(logits[variant].reshape(-1, logits[variant].shape[-1]),
                                             labels.reshape(-1), reduction="none").reshape(labels.shape)
    torch.testing.assert_close(results[variant]["eval_losses"], want, rtol=0, atol=1e-5)


def test_tokenizer_loads_with_auto_tokenizer(exported, prepared):
    from adapt_pretrain.data.manifest import Manifest

    root, _, _ = exported
    out = os.path.join(root, "gqa_tied", "hf")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    manifest = Manifest.load(prepared)
    assert tok.eos_token_id == manifest.eos_id
    from tokenizers import Tokenizer

    text = "def main():\n    return 42"
    assert tok(text)["input_ids"] == Tokenizer.from_file(manifest.tokenizer_path).encode(text).ids
    config = transformers.AutoConfig.from_pretrained(out)
    assert config.eos_token_id == manifest.eos_id and config.num_key_value_heads == 2


def test_unexportable_options_are_named():
    from adapt_pretrain.megatron import ModelConfig

    gpt2_like = ModelConfig(vocab_size=128, seq_len=16, hidden_size=16, num_layers=1, num_attention_heads=2)
    problems = unsupported_options(gpt2_like)
    assert len(problems) == 3
    for word in ("LayerNorm", "gelu", "learned_absolute"):
        assert any(word in p for p in problems), (word, problems)
    assert unsupported_options(model_cfg("gqa_tied")) == []
    assert issubclass(ExportError, ValueError)


def test_cli_refuses_a_gpt2_style_run_naming_the_options(tmp_path, capsys):
    import dataclasses
    import json

    from adapt_pretrain.cli import main
    from adapt_pretrain.megatron import ModelConfig

    ckpt = tmp_path / "run" / "checkpoints" / "step_000003"
    ckpt.mkdir(parents=True)
    model = ModelConfig(vocab_size=128, seq_len=16, hidden_size=16, num_layers=1, num_attention_heads=2)
    (ckpt / "meta.json").write_text(json.dumps({"step": 3, "config": {"model": dataclasses.asdict(model)}}))
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--step", "3"]) == 2
    err = capsys.readouterr().err
    assert "cannot be exported as LlamaForCausalLM" in err and "LayerNorm" in err and "learned_absolute" in err
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), "--step", "9"]) == 2
    assert "no complete checkpoint for step 9 (have: step_000003)" in capsys.readouterr().err
