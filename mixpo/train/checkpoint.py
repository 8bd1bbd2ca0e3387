"""Checkpoints that are either complete or absent, the output directory's lock, and the final
Hugging Face export.

`OUTPUT/checkpoint-STEP/` holds
  state/                  model + optimizer, torch.distributed.checkpoint format (sharded under
                          FSDP2, one file set per rank; also used by a single process)
  trainer_state.pt        step, sampler position, config, data fingerprint (rank 0)
  rank_state_R.pt         per rank: RNG states (python, numpy, torch CPU/CUDA), the gamma-PO
                          margin solver (each rank keeps its own queue) and metrics not yet logged
Everything is written into `.checkpoint-STEP.tmp/` and renamed to `checkpoint-STEP/` by rank 0
as the very last action (a directory rename is atomic), so a crash mid-write leaves only a
`.tmp` directory, which the next run deletes. Multi-node runs need a shared output directory.
Nothing is saved from non-finite weights (`all_finite`). A checkpoint whose files are damaged
(truncated, unreadable) is skipped for the previous complete one, with a warning naming the
file (`usable_checkpoint`); a file holding more than tensors and plain values (a crafted
pickle) stops the run with an error naming it. Nothing is unpickled with plain pickle:
`.pt` files go through torch's weights-only loader, the DCP state through
`mixpo.train.safe_dcp`.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from mixpo.files import (UnsafeFileError, atomic_output, load_tensors, remove_stale_staging,
                         replace_path)
from mixpo.train import distributed, safe_dcp

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
FINAL_DIR, RUN_INFO, LOCK_FILE = "final", "mixpo_run.json", ".mixpo.lock"
OWNER = "mixpo train"       # the writer named in checkpoint and final directories
# numpy's RNG state (an array) in rank_state files written before it was saved as a list.
_NUMPY_GLOBALS = (np.ndarray, np.dtype, type(np.dtype(np.uint32)),
                  getattr(getattr(np, "_core", np.core), "multiarray")._reconstruct)
_HELD: set = set()          # output directories this process holds (the lock is reentrant)


# ----------------------------------------------------------------------------------------------
# One writer per output directory
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def output_lock(output_dir: Path, enabled: bool = True):
    """Hold `OUTPUT/.mixpo.lock` (an exclusive flock) for the run: a second run on the same
    directory stops at once with a clear message. The kernel drops the lock when the process
    ends, however it ends (SIGKILL included), so a killed run never leaves it stuck."""
    key = str(output_dir.resolve())
    if not enabled or key in _HELD:
        yield
        return
    import fcntl

    output_dir.mkdir(parents=True, exist_ok=True)
    try:  # never through a symlink planted in the output directory
        handle = os.fdopen(os.open(output_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW,
                                   0o644), "r+")
    except OSError as error:
        raise ValueError(f"{output_dir / LOCK_FILE}: cannot open the run's lock file "
                         f"({error.strerror or error}); mixpo does not write through symbolic "
                         "links") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise ValueError(f"{output_dir} is in use by another mixpo run ({owner}); wait for it "
                         "to finish or use another output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


# ----------------------------------------------------------------------------------------------
# Finding and checking checkpoints
# ----------------------------------------------------------------------------------------------
def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    found = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            match = _CHECKPOINT.match(path.name)
            if match and (path / "trainer_state.pt").is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = complete_checkpoints(output_dir)
    return checkpoints[-1][1] if checkpoints else None


def remove_partial_checkpoints(output_dir: Path) -> None:
    """Delete the `.tmp` directories a crashed save left behind (rank 0 only)."""
    for path in output_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)
    remove_stale_staging(output_dir / FINAL_DIR)


TRAINER_KEYS = ("step", "sampler", "world_size", "config")
RANK_KEYS = ("metrics_window", "margin", "rng")


def load_trainer_state(path: Path) -> dict:
    """checkpoint `path`'s trainer_state.pt (weights-only; ValueError when keys are missing)."""
    return _state_file(path / "trainer_state.pt", TRAINER_KEYS)


def load_rank_state(path: Path, rank: int) -> dict:
    return _state_file(path / f"rank_state_{rank}.pt", RANK_KEYS, _NUMPY_GLOBALS)


def _state_file(file: Path, keys: tuple, allowed_globals: tuple = ()) -> dict:
    state = load_tensors(file, allowed_globals)
    missing = [key for key in keys if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{file}: not a complete mixpo checkpoint file (missing "
                         f"{', '.join(missing)})")
    return state


def damaged_file(path: Path, world_size: int) -> str | None:
    """The first file of checkpoint `path` that is missing, truncated, unreadable or lacks
    keys (None when it looks whole): trainer_state.pt, every rank_state_R.pt, the DCP
    .metadata, and every .distcp shard at least as long as the metadata says. A crafted file
    raises UnsafeFileError instead: that is not damage to fall back from."""
    try:
        load_trainer_state(path)
    except UnsafeFileError:
        raise
    except Exception:                                  # noqa: BLE001 - any damage counts
        return str(path / "trainer_state.pt")
    for rank in range(world_size):
        try:
            load_rank_state(path, rank)
        except UnsafeFileError:
            raise
        except Exception:                              # noqa: BLE001
            return str(path / f"rank_state_{rank}.pt")
    metadata_file = path / "state" / ".metadata"
    try:
        metadata = safe_dcp.read_metadata(path / "state")
        needed: dict[str, int] = {}
        for item in metadata.storage_data.values():
            needed[item.relative_path] = max(needed.get(item.relative_path, 0),
                                             item.offset + item.length)
    except UnsafeFileError:
        raise
    except Exception:                                  # noqa: BLE001
        return str(metadata_file)
    for name, length in needed.items():
        shard = path / "state" / name
        if not shard.is_file() or shard.stat().st_size < length:
            return str(shard)
    return None


def rng_states() -> dict:
    kind, keys, *rest = np.random.get_state()  # the array as a list: weights-only loadable
    states = {"python": random.getstate(), "numpy": (kind, keys.tolist(), *rest),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def all_finite(model: torch.nn.Module, env) -> bool:
    """Whether every parameter is finite (one device reduction, one host sync; FSDP2 shards
    are checked on every rank and the verdicts combined)."""
    flags = [torch.isfinite(param.to_local() if hasattr(param, "to_local") else param).all()
             for param in model.parameters()]
    local = torch.stack(flags).all() if flags else torch.tensor(True)
    return distributed.all_true(bool(local), env)


# ----------------------------------------------------------------------------------------------
# Saving and loading
# ----------------------------------------------------------------------------------------------
def save_checkpoint(output_dir: Path, step: int, model, optimizers: list, trainer_state: dict,
                    rank_state: dict, env, save_total_limit: int = 0) -> Path:
    """Write checkpoint-`step` atomically (every rank calls this); returns its path."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = output_dir / f"checkpoint-{step}"
    staging = output_dir / f".checkpoint-{step}.tmp"
    if env.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    distributed.barrier(env)
    model_state, optimizer_state = get_state_dict(model, optimizers)
    try:
        with warnings.catch_warnings():  # one process: DCP warns that there is no process group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": model_state, "optimizer": optimizer_state},
                     checkpoint_id=str(staging / "state"))
        torch.save({**rank_state, "rng": rng_states()}, staging / f"rank_state_{env.rank}.pt")
        if env.is_main:
            torch.save(trainer_state, staging / "trainer_state.pt")
    except (OSError, dcp.api.CheckpointException) as error:  # a full disk, lost permissions
        if env.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        raise ValueError(f"cannot save checkpoint-{step} in {output_dir} ({_os_reason(error)}); "
                         "the earlier checkpoints are intact: free space or fix permissions, "
                         "then rerun to resume") from None
    distributed.barrier(env)
    if env.is_main:
        replace_path(staging, final, OWNER)  # over a rerun's own checkpoint of that step
        if save_total_limit > 0:
            for _, old in complete_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(env)
    return final


def _os_reason(error: Exception) -> str:
    """The OS's words for a failed write (DCP wraps each rank's exception)."""
    failures = getattr(error, "failures", None)
    if failures:
        error = next(iter(failures.values()))[0]
    return getattr(error, "strerror", None) or str(error).splitlines()[0]


def load_checkpoint(path: Path, model, optimizers: list, env) -> tuple[dict, dict]:
    """Load model and optimizer state in place and restore this rank's RNG states.
    Returns (trainer_state, rank_state)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    trainer_state = load_trainer_state(path)
    if trainer_state["world_size"] != env.world_size:
        raise ValueError(f"{path} was written by {trainer_state['world_size']} processes; resume "
                         f"it with the same number (this run has {env.world_size})")
    model_state, optimizer_state = get_state_dict(model, optimizers)
    state = {"model": model_state, "optimizer": optimizer_state}
    safe_dcp.load(state, path / "state")
    set_state_dict(model, optimizers, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    rank_state = load_rank_state(path, env.rank)
    restore_rng_states(rank_state.pop("rng"))  # last: loading must not move the RNG after this
    return trainer_state, rank_state


def usable_checkpoint(output_dir: Path, world_size: int) -> Path | None:
    """The newest checkpoint whose files are whole (rank 0 decides); damaged newer ones are
    skipped with a warning naming the broken file. None when there is none at all; a
    ValueError when checkpoints exist but every one is damaged."""
    checkpoints = complete_checkpoints(output_dir)
    for _, path in reversed(checkpoints):
        broken = damaged_file(path, world_size)
        if broken is None:
            return path
        warnings.warn(f"skipping {path.name}: {broken} is damaged or truncated; falling back "
                      "to the previous checkpoint", stacklevel=2)
    if checkpoints:
        raise ValueError(f"every checkpoint in {output_dir} is damaged (see the warnings); "
                         "delete them to start over")
    return None


# ----------------------------------------------------------------------------------------------
# Same run? (config and data)
# ----------------------------------------------------------------------------------------------
# Keys a rerun may change and still continue the run in the same output directory.
RESUMABLE_CHANGES = ("max_steps", "num_train_epochs", "save_steps", "logging_steps",
                     "save_total_limit", "progress_bar", "reference_batch_size", "output_dir",
                     "device", "report_to", "eval_steps", "ddp_timeout",
                     "resume_on_changed_data")


def previous_run(output_dir: Path) -> dict | None:
    """{'config', 'completed_steps', 'fingerprint'} of the run already in `output_dir`: its
    final export if there is one, else its latest checkpoint; None for a fresh directory."""
    info = output_dir / FINAL_DIR / RUN_INFO
    if info.is_file():
        try:
            return json.loads(info.read_text())
        except (OSError, ValueError):
            warnings.warn(f"{info} is damaged; ignoring the final export", stacklevel=2)
    latest = latest_checkpoint(output_dir)
    if latest is None:
        return None
    try:
        state = load_trainer_state(latest)
    except UnsafeFileError:
        raise
    except Exception:                                  # noqa: BLE001 - checked again on resume
        return None
    return {"config": state["config"], "completed_steps": None,
            "fingerprint": state.get("fingerprint")}


def check_same_run(previous: dict | None, config: dict, output_dir: Path,
                   fingerprint: str | None = None, allow_changed_data: bool = False) -> None:
    """ValueError when `output_dir` holds a run whose settings differ from `config` in a way
    that changes the trajectory (anything but RESUMABLE_CHANGES), or whose training data or
    model changed (its fingerprint) unless `allow_changed_data`."""
    if previous is None:
        return
    from mixpo.train.config import canonical_config_dict

    before = canonical_config_dict(previous["config"])
    changed = [f"{key}: {before.get(key)!r} -> {value!r}" for key, value in config.items()
               if key not in RESUMABLE_CHANGES and key in before and before.get(key) != value]
    if changed:
        raise ValueError(f"{output_dir} holds a run with other settings ({'; '.join(changed)}); "
                         "use another output_dir, or delete that one to start over")
    recorded = previous.get("fingerprint")
    if fingerprint and recorded and recorded != fingerprint and not allow_changed_data:
        raise ValueError(f"{output_dir} holds a run on other training data or another model "
                         "(the tokenized pairs or the model files changed since it was "
                         "written); use another output_dir, or set resume_on_changed_data "
                         "true to continue anyway")


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------
def export_final(output_dir: Path, model, causal_lm, tokenizer, run_info: dict, env) -> Path:
    """`OUTPUT/final/`: the policy in Hugging Face format (safetensors) plus the tokenizer,
    loadable with AutoModelForCausalLM.from_pretrained. Gathered to rank 0, written atomically."""
    return export_model(output_dir / FINAL_DIR, model, causal_lm, tokenizer, run_info, env,
                        OWNER)


def export_model(target: Path, model, causal_lm, tokenizer, run_info: dict, env,
                 owner: str) -> Path:
    """`model`'s (a PreferenceModel, possibly FSDP-sharded) causal LM as a Hugging Face model
    directory at `target`, with the tokenizer and `mixpo_run.json`, written as `owner`'s
    (an existing directory there is replaced only if `owner` wrote it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                      cpu_offload=True))
    if env.is_main:
        prefix = "causal_lm."
        state = {name[len(prefix):]: tensor for name, tensor in full_state.items()
                 if name.startswith(prefix)}
        with atomic_output(target, directory=True, owner=owner) as staging:
            causal_lm.save_pretrained(staging, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            (staging / RUN_INFO).write_text(json.dumps(run_info, indent=1))
    distributed.barrier(env)
    return target
