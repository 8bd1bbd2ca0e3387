"""Checkpoints that are either complete or absent, and the final Hugging Face export.

`OUTPUT/checkpoint-STEP/` holds
  state/                  model + optimizer, torch.distributed.checkpoint format (sharded under
                          FSDP2, one file set per rank; also used by a single process)
  trainer_state.pt        step, sampler position, config (rank 0)
  rank_state_R.pt         per rank: RNG states (python, numpy, torch CPU/CUDA), the gamma-PO
                          margin solver (each rank keeps its own queue) and metrics not yet logged
Everything is written into `.checkpoint-STEP.tmp/` and renamed to `checkpoint-STEP/` by rank 0
as the very last action (a directory rename is atomic), so a crash mid-write leaves only a
`.tmp` directory, which the next run deletes. Multi-node runs need a shared output directory.
"""
from __future__ import annotations

import json
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from mixpo.files import atomic_output, replace_path
from mixpo.train import distributed

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
FINAL_DIR, RUN_INFO = "final", "mixpo_run.json"


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


def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(),
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
    with warnings.catch_warnings():  # one process: DCP warns that there is no process group
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_state, "optimizer": optimizer_state},
                 checkpoint_id=str(staging / "state"))
    torch.save({**rank_state, "rng": rng_states()}, staging / f"rank_state_{env.rank}.pt")
    if env.is_main:
        torch.save(trainer_state, staging / "trainer_state.pt")
    distributed.barrier(env)
    if env.is_main:
        replace_path(staging, final)  # over a rerun's own checkpoint of the same step, if any
        if save_total_limit > 0:
            for _, old in complete_checkpoints(output_dir)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier(env)
    return final


def load_checkpoint(path: Path, model, optimizers: list, env) -> tuple[dict, dict]:
    """Load model and optimizer state in place and restore this rank's RNG states.
    Returns (trainer_state, rank_state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    trainer_state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
    if trainer_state["world_size"] != env.world_size:
        raise ValueError(f"{path} was written by {trainer_state['world_size']} processes; resume "
                         f"it with the same number (this run has {env.world_size})")
    model_state, optimizer_state = get_state_dict(model, optimizers)
    state = {"model": model_state, "optimizer": optimizer_state}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path / "state"))
    set_state_dict(model, optimizers, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])
    rank_state = torch.load(path / f"rank_state_{env.rank}.pt", map_location="cpu",
                            weights_only=False)
    restore_rng_states(rank_state.pop("rng"))  # last: loading must not move the RNG after this
    return trainer_state, rank_state


# Keys a rerun may change and still continue the run in the same output directory.
RESUMABLE_CHANGES = ("max_steps", "num_epochs", "save_steps", "logging_steps",
                     "save_total_limit", "progress_bar", "reference_batch_size", "output_dir",
                     "device")


def previous_run(output_dir: Path) -> dict | None:
    """{'config': ..., 'completed_steps': ...} of the run already in `output_dir`: its final
    export if there is one, else its latest checkpoint; None for a fresh directory."""
    info = output_dir / FINAL_DIR / RUN_INFO
    if info.is_file():
        return json.loads(info.read_text())
    latest = latest_checkpoint(output_dir)
    if latest is None:
        return None
    state = torch.load(latest / "trainer_state.pt", map_location="cpu", weights_only=False)
    return {"config": state["config"], "completed_steps": None}


def check_same_run(previous: dict | None, config: dict, output_dir: Path) -> None:
    """ValueError when `output_dir` holds a run whose settings differ from `config` in a way
    that changes the trajectory (anything but RESUMABLE_CHANGES)."""
    if previous is None:
        return
    changed = [f"{key}: {previous['config'].get(key)!r} -> {value!r}"
               for key, value in config.items()
               if key not in RESUMABLE_CHANGES and previous["config"].get(key) != value]
    if changed:
        raise ValueError(f"{output_dir} holds a run with other settings ({'; '.join(changed)}); "
                         "use another output_dir, or delete that one to start over")


def export_final(output_dir: Path, model, causal_lm, tokenizer, run_info: dict, env) -> Path:
    """`OUTPUT/final/`: the policy in Hugging Face format (safetensors) plus the tokenizer,
    loadable with AutoModelForCausalLM.from_pretrained. Gathered to rank 0, written atomically."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                      cpu_offload=True))
    final = output_dir / FINAL_DIR
    if env.is_main:
        prefix = "causal_lm."
        state = {name[len(prefix):]: tensor for name, tensor in full_state.items()
                 if name.startswith(prefix)}
        with atomic_output(final, directory=True) as staging:
            causal_lm.save_pretrained(staging, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            (staging / RUN_INFO).write_text(json.dumps(run_info, indent=1))
    distributed.barrier(env)
    return final
