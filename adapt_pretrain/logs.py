"""One logging setup for every command: rank-prefixed diagnostics on stderr, level from ADAPT_LOG_LEVEL.

Diagnostics (warnings, progress notes, fallbacks) go through `logging` under the `adapt_pretrain`
logger; results and summaries a user or a script reads stay on stdout as plain prints.
The rank comes from the launcher's RANK variable (deepspeed, torchrun), so every line of a
multi-process run says which process wrote it.
"""
from __future__ import annotations

import logging
import os
import sys

LEVEL_ENV = "ADAPT_LOG_LEVEL"
ROOT_LOGGER = "adapt_pretrain"
_HANDLER_NAME = "adapt_pretrain.logs"


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at each record (tests and tools swap it), not the one at setup."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def log_level() -> int:
    """The level named by ADAPT_LOG_LEVEL (DEBUG, INFO, WARNING, ERROR; default INFO)."""
    name = os.environ.get(LEVEL_ENV, "INFO").strip().upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ValueError(f"{LEVEL_ENV}={os.environ[LEVEL_ENV]!r} is not a logging level "
                         "(use DEBUG, INFO, WARNING or ERROR)")
    return level


def setup_logging(rank: int | None = None) -> logging.Logger:
    """Configure the `adapt_pretrain` logger once per process (calling again only updates rank and level)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    logger = logging.getLogger(ROOT_LOGGER)
    handler = next((h for h in logger.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = _CurrentStderrHandler()
        handler.set_name(_HANDLER_NAME)
        logger.addHandler(handler)
        logger.propagate = False  # one line per record, even when the host application configured root
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
    logger.setLevel(log_level())
    return logger


def quiet_known_warnings() -> None:
    """Silence megatron's import-time notices that Apex / Transformer Engine are absent: expected (it
    falls back to torch), and on every rank they would bury the diagnostics that matter."""
    import warnings

    for pattern in (".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
                    ".*full scope is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning)


def get_logger(name: str) -> logging.Logger:
    """A logger under `adapt_pretrain` (unconfigured, warnings still reach stderr via logging's fallback)."""
    return logging.getLogger(name if name.startswith(ROOT_LOGGER) else f"{ROOT_LOGGER}.{name}")
