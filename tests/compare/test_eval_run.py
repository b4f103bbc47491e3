"""`adapt-pretrain eval` on a real trained run: the per-domain budget on very different files, the
output path, and process groups that never collide (several evals at once on one host)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from .conftest import REPO, child_env, run_module

BUDGET, DOCS = 1024, 64


def _words(rng_seed: int, n: int) -> str:
    import numpy as np

    vocab = "the of and to in data model loss token weight domain anchor train step value return def class".split()
    rng = np.random.default_rng(rng_seed)
    return " ".join(vocab[i] for i in rng.integers(0, len(vocab), size=n))


def _write_jsonl(path, texts, domain):
    path.write_text("".join(json.dumps({"text": t, "domain": domain}) + "\n" for t in texts))
    return str(path)


def test_budget_on_a_long_document_file_and_a_many_document_file(trained_run, tmp_path):
    long_file = _write_jsonl(tmp_path / "long.jsonl", [_words(i, 6000) for i in range(3)], "long")
    many_file = _write_jsonl(tmp_path / "many.jsonl", [_words(100 + i, 40 + i % 50) for i in range(2000)], "many")
    proc = run_module(["adapt_pretrain.evaluate", "--run", trained_run, "--data", long_file, many_file,
                       "--max-tokens", str(BUDGET), "--docs", str(DOCS), "--seed", "3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = os.path.join(trained_run, "eval.json")  # the default path: not compare's result.json
    result = json.load(open(out))
    long, many = result["domains"]["long"], result["domains"]["many"]
    assert (long["tokens"], long["docs"], long["docs_available"], long["whole_docs"]) == (BUDGET, 3, 3, 0)
    assert (many["tokens"], many["docs"], many["docs_available"]) == (BUDGET, DOCS, 2000)
    assert many["max_doc_tokens"] <= -(-BUDGET // DOCS) + 1  # spread evenly, not piled on a few documents
    assert result["settings"] == {"max_tokens": BUDGET, "docs": DOCS, "doc_tokens": None, "seed": 3}
    for name, dom in result["domains"].items():  # the demo validation split: all it has, up to the budget
        assert 0 < dom["tokens"] <= BUDGET and 2.0 < dom["loss"] < 10.0, name
    refused = run_module(["adapt_pretrain.evaluate", "--run", trained_run, "--out",
                          os.path.join(str(tmp_path), "result.json")], timeout=120)
    assert refused.returncode == 2 and "compare's own file" in refused.stderr


def test_evals_at_once_on_one_host_and_the_launchers_port(trained_run, tmp_path):
    """Two plain evals at the same time (with the old fixed default port held by someone else), one
    under a launcher's free MASTER_PORT and one under a launcher's port that is taken: the first three
    succeed, the last fails with a message, not a traceback."""
    holders = []
    for port in (29512, 29500):  # ports a fixed default would pick; held here unless someone else has them
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
            holders.append(sock)
        except OSError:
            sock.close()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    free_port = free.getsockname()[1]
    free.close()
    launcher = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    jobs = {"a": {}, "b": {}, "launcher": {**launcher, "MASTER_PORT": str(free_port)},
            "taken": {**launcher, "MASTER_PORT": str(taken.getsockname()[1])}}
    try:
        procs = {name: subprocess.Popen([sys.executable, "-m", "adapt_pretrain.evaluate", "--run", trained_run,
                                         "--max-tokens", "4096", "--out", str(tmp_path / f"{name}.json")],
                                        cwd=REPO, env=child_env(**extra), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
                 for name, extra in jobs.items()}
        done = {name: (p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for name, p in procs.items()}
    finally:
        for sock in (*holders, taken):
            sock.close()
    for name in ("a", "b", "launcher"):
        assert done[name][0] == 0, f"{name}: {done[name][2][-3000:]}"
        assert (tmp_path / f"{name}.json").exists()
    a, b = (json.load(open(tmp_path / f"{n}.json")) for n in ("a", "b"))
    assert a["domains"] == b["domains"]  # same run, same sample: same numbers
    rc, _, err = done["taken"]
    assert rc == 2 and "already in use" in err and "Traceback" not in err, err[-3000:]
