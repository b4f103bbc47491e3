"""Atomic, verified, resumable checkpoints: the run's state, plus the config and layout it belongs to.

Layout on disk (`run_dir` must be on a filesystem every node sees):
    checkpoints/step_000040/model/           model chunks, optimiser, scheduler: a sharded megatron
                                             checkpoint, readable by any layout (megatron/dist_ckpt.py)
    checkpoints/step_000040/run/             ADAPT engine, data cursors, RNG, loop counters
                                             (megatron/run_state.py)
    checkpoints/step_000040/meta.json        step, config, parallel layout (rank 0)
    checkpoints/step_000040/manifest.json    size and sha256 of every file above, written last
    checkpoints/latest                       name of the newest committed checkpoint (a hint only)
    checkpoints/pinned                       the last checkpoint before the latest non-finite streak
    checkpoints/superseded_<time>/           checkpoints moved out of the way (rollback, damage, restart)
A checkpoint is written into `step_N.tmp/` and renamed only after every rank has finished, so a crash
mid-save leaves the previous checkpoint intact. Resuming scans the step folders newest first and takes
the first one whose files match their checksums on every rank, so an empty, damaged or stale `latest`
or a damaged newest checkpoint costs at most the steps since the previous one, never the run. Nothing
here deletes a checkpoint except `prune_checkpoints` (keep_checkpoints), which spares the pinned one.
The integrity functions work on file lists and checksums, not on what the files hold, so they stay
valid whatever serialises a rank's state (`write_rank_state` is the only part that knows; legacy
checkpoints held one `rank_NNNNN.pt` per rank instead). Each file's manifest entry names the rank that
reported it, which is the rank that verifies it on resume.
Resuming compares the saved config and layout with the current ones and refuses any difference that
would silently change the run (different model, data, global batch), naming each field; the parallel
layout itself may change.

One job per module: names.py (file names, constants, the error type), rng.py, integrity.py (checksums),
selection.py (what to resume), retention.py (set aside, pin, prune), storage.py (atomic save, load),
compatibility.py (what may change on resume).
"""
from __future__ import annotations

from adapt_pretrain.checkpointing.names import (CHECKPOINT_SUBDIR, checkpoint_root, FORMAT_VERSION, LATEST, META,
    MANIFEST, PINNED, SUPERSEDED_PREFIX,
    Exchange, RankState, single_process, CheckpointError, step_dir_name, step_of, rank_file, atomic_write_text,
    read_meta)
from adapt_pretrain.checkpointing.rng import (rng_state, set_rng_state)
from adapt_pretrain.checkpointing.integrity import (file_digest, describe_files, write_manifest, verify_checkpoint,
    has_checksums, verify_everywhere)
from adapt_pretrain.checkpointing.selection import (committed_checkpoints, read_latest, Selection, select_checkpoint,
    find_checkpoint, find_run_checkpoint)
from adapt_pretrain.checkpointing.retention import (set_aside, set_aside_all, set_aside_newer, pin_checkpoint,
    pinned_checkpoint, prune_checkpoints)
from adapt_pretrain.checkpointing.storage import (write_rank_state, save_checkpoint, load_rank_state)
from adapt_pretrain.checkpointing.compatibility import (SAFE_TO_CHANGE, CHANGE_WITH_CONSENT, changed_fields,
    consent_problems, config_differences, consented_changes, global_batch, layout_problems, same_layout,
    check_resume_compatible)

__all__ = ['CHECKPOINT_SUBDIR', 'checkpoint_root', 'find_run_checkpoint', 'FORMAT_VERSION', 'LATEST', 'META', 'MANIFEST', 'PINNED', 'SUPERSEDED_PREFIX', 'Exchange', 'RankState',
           'single_process', 'CheckpointError', 'step_dir_name', 'step_of', 'rank_file', 'atomic_write_text',
           'read_meta', 'rng_state', 'set_rng_state', 'file_digest', 'describe_files', 'write_manifest',
           'verify_checkpoint', 'has_checksums', 'verify_everywhere', 'committed_checkpoints', 'read_latest',
           'Selection', 'select_checkpoint', 'find_checkpoint', 'set_aside', 'set_aside_all', 'set_aside_newer',
           'pin_checkpoint', 'pinned_checkpoint', 'prune_checkpoints', 'write_rank_state', 'save_checkpoint',
           'load_rank_state', 'SAFE_TO_CHANGE', 'CHANGE_WITH_CONSENT', 'changed_fields', 'consent_problems',
           'config_differences', 'consented_changes', 'global_batch', 'layout_problems', 'same_layout',
           'check_resume_compatible']
