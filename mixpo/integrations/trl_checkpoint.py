"""gamma-PO's solver state in TRL checkpoints (`MixpoDPOTrainer`): one file per process,
`mixpo_margin_rank<r>.pt`, written with the RNG states (before trainer_state.json, which
transformers writes last, and before old checkpoints are rotated away), read back
weights-only (`mixpo.files.load_tensors`: tensors, numbers, lists and dicts; a file that
asks for anything else is refused), and the choice of the checkpoint to resume from: the newest
complete one for `resume_from_checkpoint=True`."""
from __future__ import annotations

import logging
import os
import pickle
import re

import torch

logger = logging.getLogger(__name__)
MARGIN_STATE = "mixpo_margin_rank{rank}.pt"
TRAINER_STATE = "trainer_state.json"       # transformers' TRAINER_STATE_NAME, written last
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def save_margin_state(margin, folder: str, rank: int) -> None:
    from mixpo.files import atomic_output

    with atomic_output(os.path.join(folder, MARGIN_STATE.format(rank=rank))) as staging:
        torch.save(margin.state_dict(), staging)


def load_margin_state(margin, path: str) -> None:
    """Restore `margin` (a mixpo.AdaptiveMargin) from `path`; ValueError naming the file for
    one mixpo did not write (a pickle that runs code included: never unpickled)."""
    from mixpo.files import load_tensors

    try:        # UnsafeFileError (a ValueError) passes through: a crafted file is not damaged
        state = load_tensors(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:  # damaged
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise ValueError(f"{path}: not a gamma-PO solver state mixpo wrote ({reason})") \
            from None
    if not (isinstance(state, dict) and isinstance(state.get("queue"), list)
            and isinstance(state.get("generator"), torch.Tensor)
            and state["generator"].dtype == torch.uint8):
        raise ValueError(f"{path}: not a gamma-PO solver state (a dict with a 'queue' list and "
                         "a uint8 'generator' tensor)")
    try:
        margin.load_state_dict(state)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(f"{path}: {error}") from None


def _checkpoints(output_dir: str) -> list:
    """The checkpoint folders of `output_dir`, newest (highest step) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(match.group(1)), os.path.join(output_dir, name))
             for name in os.listdir(output_dir)
             if (match := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir,
                                                                                  name))]
    return [path for _, path in sorted(found, reverse=True)]


def incomplete(checkpoint: str, world_size: int, margin: bool):
    """Why `checkpoint` cannot be resumed from (None: it can)."""
    if not os.path.isfile(os.path.join(checkpoint, TRAINER_STATE)):
        return f"{TRAINER_STATE} is missing: its save was interrupted"
    if not margin:
        return None
    missing = [MARGIN_STATE.format(rank=rank) for rank in range(world_size)
               if not os.path.isfile(os.path.join(checkpoint, MARGIN_STATE.format(rank=rank)))]
    if not missing:
        return None
    return (f"{', '.join(missing)} missing (gamma-PO's solver state): its save was "
            "interrupted, or the run that wrote it had no adaptive_margin or another process "
            f"count than this run's {world_size}")


def resolve_resume(resume_from_checkpoint, output_dir: str, world_size: int, margin: bool):
    """The checkpoint to resume from. `True` picks the newest complete checkpoint of
    `output_dir` (transformers' get_last_checkpoint picks the newest, complete or not), with a
    warning naming any newer incomplete one; a path must be complete (ValueError naming what
    is missing and the newest complete checkpoint to pass instead)."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return resume_from_checkpoint
    if resume_from_checkpoint is True:
        candidates = _checkpoints(output_dir)
        if not candidates:
            return True                      # transformers says "no valid checkpoint"
        skipped = []
        for checkpoint in candidates:
            reason = incomplete(checkpoint, world_size, margin)
            if reason is None:
                for newer, why in skipped:
                    logger.warning(f"mixpo: not resuming from {newer} ({why}); resuming from "
                                   f"{checkpoint}, the newest complete checkpoint")
                return checkpoint
            skipped.append((checkpoint, reason))
        raise ValueError(f"no complete checkpoint in {output_dir} to resume from: "
                         f"{skipped[0][0]}: {skipped[0][1]}")
    checkpoint = str(resume_from_checkpoint)
    reason = incomplete(checkpoint, world_size, margin) if os.path.isdir(checkpoint) else None
    if reason is None:
        return resume_from_checkpoint
    older = [path for path in _checkpoints(os.path.dirname(os.path.abspath(checkpoint)))
             if incomplete(path, world_size, margin) is None]
    fallback = (f"; resume from {older[0]} (the newest complete checkpoint), or pass "
                "resume_from_checkpoint=True to pick it") if older else ""
    raise ValueError(f"cannot resume from {checkpoint}: {reason}{fallback}")
