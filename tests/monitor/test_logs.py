"""One logging setup: rank-prefixed lines on stderr, level from ADAPT_LOG_LEVEL, stdout left to results."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = """
from adapt_pretrain.logs import get_logger, setup_logging
setup_logging()
setup_logging()  # twice: still one line per record
log = get_logger("monitor.probe")
log.debug("debug line")
log.info("info line")
log.warning("warning line")
print("result line")
"""


def _run(**env):
    return subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=REPO, **env))


def test_rank_prefix_and_level_from_env():
    out = _run(RANK="3", ADAPT_LOG_LEVEL="debug")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "result line\n"
    assert out.stderr.splitlines() == ["[rank 3] DEBUG adapt_pretrain.monitor.probe: debug line",
                                       "[rank 3] INFO adapt_pretrain.monitor.probe: info line",
                                       "[rank 3] WARNING adapt_pretrain.monitor.probe: warning line"]


def test_level_filters_and_default_rank():
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=dict(env, PYTHONPATH=REPO, ADAPT_LOG_LEVEL="WARNING"))
    assert out.stderr.splitlines() == ["[rank 0] WARNING adapt_pretrain.monitor.probe: warning line"]


def test_unknown_level_is_named(monkeypatch):
    from adapt_pretrain.logs import log_level
    monkeypatch.setenv("ADAPT_LOG_LEVEL", "LOUD")
    with pytest.raises(ValueError, match="ADAPT_LOG_LEVEL='LOUD'"):
        log_level()
