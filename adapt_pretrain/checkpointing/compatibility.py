"""Whether a checkpoint may be resumed by the current config and layout, and which changes need consent."""
from __future__ import annotations

import json
from typing import Any, Sequence

from adapt_pretrain.checkpointing.names import CheckpointError


# Config fields that may change between a run and its resume without changing what is computed.
# data.data_dir may move: the data stream checks the manifest's content hash itself on resume.
# prepare.* only acts when the data dir has no manifest, which a resumable run always has.
SAFE_TO_CHANGE = (
    "train.steps", "train.log_interval", "train.checkpoint_interval", "train.keep_checkpoints",
    "train.stop_at_step", "train.progress_bar", "train.max_nonfinite_in_row", "train.run_dir",
    "train.collective_timeout_s", "train.watchdog", "train.callbacks",
    "wandb.", "data.prefetch_factor", "data.verify_checksums", "data.data_dir", "prepare.",
    # the layout: model and optimiser are resharded, the data stream is redistributed; what must
    # stay is the global batch, checked separately (`layout_problems`)
    "parallel.", "data.num_workers", "train.global_batch_size", "train.gradient_accumulation_steps",
    # runtime values that older checkpoints stored in the config (now derived from the layout)
    "data.dp_rank", "data.dp_size",
)
# Fields that may change on resume only when the user names them (`--allow-change`); each change is
# logged. The optimiser's settings change how the run continues, not what the saved state means.
CHANGE_WITH_CONSENT = ("optim.",)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _matches(key: str, patterns: Sequence[str]) -> bool:
    """`key` is one of `patterns` or under one ending in '.' (a whole section or subsection)."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def changed_fields(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, checkpoint value, current value) for every flattened config field that differs."""
    old = _flatten(json.loads(json.dumps(saved, default=str)))
    new = _flatten(json.loads(json.dumps(current, default=str)))
    return [(key, old.get(key, "<absent>"), new.get(key, "<absent>")) for key in sorted(set(old) | set(new))
            if old.get(key, "<absent>") != new.get(key, "<absent>")]


def consent_problems(allow: Sequence[str]) -> list[str]:
    """The `--allow-change` entries that are not fields which may change with consent."""
    return [f for f in allow if not _matches(f, CHANGE_WITH_CONSENT) and f.rstrip("*") not in CHANGE_WITH_CONSENT]


def _allowed(allow: Sequence[str]) -> tuple[str, ...]:
    return tuple(f.rstrip("*") for f in allow)  # "optim.*" and "optim." mean the whole section


def config_differences(saved: dict[str, Any], current: dict[str, Any], allow: Sequence[str] = ()) -> list[str]:
    """Unsafe differences between two config dicts, as 'field: saved -> current' lines."""
    return [f"  {key}: {a!r} (checkpoint) -> {b!r} (now)" for key, a, b in changed_fields(saved, current)
            if not _matches(key, SAFE_TO_CHANGE) and not _matches(key, _allowed(allow))]


def consented_changes(saved: dict[str, Any], current: dict[str, Any],
                      allow: Sequence[str]) -> list[tuple[str, Any, Any]]:
    """The differences the user allowed with `--allow-change` (to be applied and logged)."""
    return [(key, a, b) for key, a, b in changed_fields(saved, current)
            if not _matches(key, SAFE_TO_CHANGE) and _matches(key, _allowed(allow))]


def global_batch(layout: dict[str, Any]) -> int | None:
    """Sequences per optimiser step over all data-parallel ranks."""
    try:
        return int(layout["dp"]) * int(layout["num_microbatches"]) * int(layout["micro_batch_size"])
    except (KeyError, TypeError, ValueError):
        return None


def layout_problems(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """A layout change is safe (resharded model and optimiser, redistributed data) unless the global
    batch changes: the optimiser would then take other steps than the saved run."""
    before, after = global_batch(saved), global_batch(now)
    if before == after:
        return []
    return [f"the global batch changed: {before} sequences per step (checkpoint: dp={saved.get('dp')} x "
            f"{saved.get('num_microbatches')} micro-batches x {saved.get('micro_batch_size')}) -> {after} (now: "
            f"dp={now.get('dp')} x {now.get('num_microbatches')} x {now.get('micro_batch_size')}); set "
            f"train.global_batch_size={before} to keep it with another data-parallel size"]


def same_layout(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    keys = ("world_size", "tp", "pp", "vp", "dp")
    return all(saved.get(k) == now.get(k) for k in keys)


def check_resume_compatible(meta: dict[str, Any], config: dict[str, Any], layout: dict[str, Any],
                            allow: Sequence[str] = ()) -> None:
    """Raise CheckpointError naming every unsafe change between the checkpoint and this run."""
    problems: list[str] = layout_problems(meta.get("layout", {}), layout)
    cfg_diff = config_differences(meta.get("config", {}), config, allow)
    if cfg_diff:
        problems.append("the config changed in fields that alter the run:\n" + "\n".join(cfg_diff))
    if problems:
        safe = ", ".join(s.rstrip(".") + ("*" if s.endswith(".") else "") for s in SAFE_TO_CHANGE)
        consent = ", ".join(s.rstrip(".") + ("*" if s.endswith(".") else "") for s in CHANGE_WITH_CONSENT)
        raise CheckpointError(
            f"cannot resume from checkpoint at step {meta.get('step')}:\n" + "\n".join(problems)
            + f"\nFields that may change on resume: {safe}. Fields that may change when named in "
              f"--allow-change (e.g. --allow-change optim.lr,optim.min_lr; logged): {consent}. "
              "Start a new run_dir to train with a different setup.", same_on_every_rank=True)
