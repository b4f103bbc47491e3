"""Eval's seen/unseen averaging, window packing, compare's skip/resume bookkeeping and report tables."""
import json
import math
import os

import numpy as np
import pytest

from adapt_pretrain.evaluate import domain_averages, read_jsonl_texts
from adapt_pretrain.experiments.methods import runs as R
from adapt_pretrain.trained_model import pack_windows
from adapt_pretrain.experiments.methods.plan import CompareConfig, plan_runs
from adapt_pretrain.experiments.methods.report import (aggregate, loss_curve, markdown_tables, mean_std, metrics_summary,
                                                       update_marked_block, weight_curves)


def test_domain_averages_hand_computed():
    losses = {"py": 2.0, "linux": 3.0, "bible": 4.0, "html": 6.0, "fort": 5.0}
    avg = domain_averages(losses, seen=["py", "linux"])
    assert avg["seen"]["loss"] == 2.5 and avg["seen"]["domains"] == 2
    assert avg["unseen"]["loss"] == 5.0  # (4 + 6 + 5) / 3, unweighted by domain size
    assert avg["all"]["loss"] == 4.0
    assert math.isclose(avg["unseen"]["ppl"], math.exp(5.0))
    assert "seen" not in domain_averages({"a": 1.0}, seen=[])


def test_pack_windows_overlap_by_one_and_mask_padding():
    stream = np.array([9, 1, 2, 3, 0, 4, 5, 0])
    labels = np.array([1, 1, 0, 1, 1, 1, 0], dtype=np.float32)  # flags of stream[1:]
    w, m = pack_windows(stream, labels, seq_len=4, pad_id=0)
    # 7 labels -> windows [9 1 2 3 0], [0 4 5 0 pad]: consecutive windows share one token
    np.testing.assert_array_equal(w, [[9, 1, 2, 3, 0], [0, 4, 5, 0, 0]])
    np.testing.assert_array_equal(m, [[1, 1, 0, 1], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="label flags"):
        pack_windows(stream, labels[:-1], seq_len=4, pad_id=0)


def test_read_jsonl_texts_domain_default(tmp_path):
    p = tmp_path / "extra_set.jsonl"
    p.write_text(json.dumps({"text": "a b"}) + "\n" + json.dumps({"text": "c", "domain": "x"}) + "\n\n"
                 + json.dumps({"text": "  "}) + "\n")
    assert read_jsonl_texts(str(p)) == {"extra_set": ["a b"], "x": ["c"]}


def _cfg(tmp_path, methods=("uniform", "adapt")):
    run = {"model": {"vocab_size": 64, "seq_len": 8, "hidden_size": 8, "num_layers": 1, "num_attention_heads": 2},
           "train": {"steps": 4, "micro_batch_size": 2}}
    return CompareConfig(out_dir=str(tmp_path), prepare={}, run=run, methods=list(methods), seeds=[1, 2])


def _fake_result(spec, seen_loss, unseen_loss):
    ev = {"domains": {"s": {"loss": seen_loss}, "u": {"loss": unseen_loss}}, "seen": ["s"],
          "averages": domain_averages({"s": seen_loss, "u": unseen_loss}, ["s"])}
    return {"method": spec.method, "seed": spec.seed, "fingerprint": spec.fingerprint, "eval": ev,
            "flops": {"training": 100, "total": 110, "overhead_ratio": 1.1}, "train_seconds": 5}


def test_finished_runs_are_skipped_and_stale_ones_redone(tmp_path):
    specs = plan_runs(_cfg(tmp_path))
    assert R.pending(specs) == specs
    done = specs[1]
    assert R.prepare_run_dir(done) is False  # fresh
    R.write_json(os.path.join(done.run_dir, R.RESULT), _fake_result(done, 2.0, 3.0))
    assert done not in R.pending(specs) and len(R.pending(specs)) == 3
    assert R.cached_result(done)["seed"] == done.seed
    # same config again: kept and resumable; another config in the same dir: stale, wiped
    assert R.prepare_run_dir(done) is True and os.path.exists(os.path.join(done.run_dir, R.RESULT))
    changed = _cfg(tmp_path)
    changed.run["train"]["steps"] = 5
    new = [s for s in plan_runs(changed) if s.run_dir == done.run_dir][0]
    assert R.cached_result(new) is None
    assert R.prepare_run_dir(new) is False and not os.path.exists(os.path.join(done.run_dir, R.RESULT))


def test_train_command_resumes_and_env_drops_launcher_vars(tmp_path, monkeypatch):
    spec = plan_runs(_cfg(tmp_path))[0]
    assert R.train_command(spec)[-1] == "--resume"
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("MASTER_PORT", "1")
    env = R.subprocess_env(threads=2)
    assert "RANK" not in env and "MASTER_PORT" not in env and env["OMP_NUM_THREADS"] == "2"


def test_metrics_summary_takes_last_record_per_step(tmp_path):
    lines = [{"step": 0, "scalars": {"loss": 5.0, "adapt/groups": 3}}, {"step": 1, "scalars": {"loss": 4.0, "adapt/groups": 4}},
             {"step": 1, "scalars": {"loss": 4.5, "adapt/groups": 4}}, {"event": "x"}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    s = metrics_summary(str(tmp_path))
    assert s["steps_logged"] == 2 and s["groups"] == 7 and s["final_loss"] == 4.5
    assert loss_curve(str(tmp_path)) == ([0, 1], [5.0, 4.5])


def test_aggregate_mean_std_and_markdown(tmp_path):
    specs = plan_runs(_cfg(tmp_path))
    losses = {("uniform", 1): (2.0, 4.0), ("uniform", 2): (2.2, 4.4), ("adapt", 1): (1.9, 4.1), ("adapt", 2): (2.1, 4.3)}
    agg = aggregate([_fake_result(s, *losses[(s.method, s.seed)]) for s in specs])
    m, sd = agg["uniform"]["averages"]["seen"]
    assert math.isclose(m, 2.1) and math.isclose(sd, math.sqrt(0.02))  # ddof=1 over 2 seeds
    assert mean_std([3.0]) == (3.0, 0.0)
    md = markdown_tables(agg, ["uniform", "adapt"])
    assert "| adapt | 2 | 2.000 ± 0.141 (7.4) | 4.200 ± 0.141 (66.7) |" in md and "-0.100" in md
    assert "| s * |" in md
    report = tmp_path / "R.md"
    report.write_text("# R\n\nintro\n\n<!-- compare:begin -->\nold\n<!-- compare:end -->\n\nreading\n")
    update_marked_block(str(report), "new table")
    text = report.read_text()
    assert "old" not in text and "new table" in text and text.startswith("# R\n\nintro") and text.endswith("reading\n")


def test_paired_deltas_per_seed(tmp_path):
    specs = plan_runs(_cfg(tmp_path))
    losses = {("uniform", 1): (2.0, 4.0), ("uniform", 2): (2.2, 4.4), ("adapt", 1): (1.9, 4.1), ("adapt", 2): (2.3, 4.3)}
    md = markdown_tables(aggregate([_fake_result(s, *losses[(s.method, s.seed)]) for s in specs]), ["uniform", "adapt"])
    assert "| method | seed 1 | seed 2 |" in md
    assert "| adapt | -0.100 / +0.100 | +0.100 / -0.100 |" in md  # 1.9-2.0 / 4.1-4.0 and 2.3-2.2 / 4.3-4.4


def test_weight_curves_and_their_plot(tmp_path):
    from adapt_pretrain.experiments.methods.report import plot_all

    lines = [{"step": s, "scalars": {"domain/a/token_share": 0.5, "domain/a/weighted_share": 0.5 + 0.1 * s,
                                     "domain/b/token_share": 0.5, "domain/b/weighted_share": 0.5 - 0.1 * s,
                                     "domain/c/token_share": 0.0}} for s in range(3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    w = weight_curves(str(tmp_path))
    assert set(w) == {"a", "b"} and w["a"][0] == [0, 1, 2]  # a domain absent from the batches has no curve
    np.testing.assert_allclose(w["a"][1], [1.0, 1.2, 1.4])
    np.testing.assert_allclose(w["b"][1], [1.0, 0.8, 0.6])
    specs = plan_runs(_cfg(tmp_path))
    agg = aggregate([_fake_result(s, 2.0, 3.0) for s in specs])
    paths = plot_all(agg, ["uniform", "adapt"], {}, str(tmp_path / "plots"), weights={"adapt": w})
    assert os.path.basename(paths[-1]) == "weight_curricula.png" and os.path.getsize(paths[-1]) > 1000
