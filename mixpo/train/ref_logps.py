"""Reference log-probs computed once, before training, and cached on disk.

DPO-style losses need log pi_ref(y|x) of every chosen and rejected completion. The reference
is the initial policy, so one forward-only pass over the data (`mixpo.sequence_logps`,
logit-free) gives them all; training then never holds a reference model in memory.

The cache file (`OUTPUT/reference_logps.pt`) is keyed by a hash of the model (directory,
config, weight files' names, sizes and modification times; a Hub id by its name), the dtype and the
tokenized data itself (every token id and prompt length, which covers the data file, its
order and selection, the tokenizer and the truncation settings). Any change gives a new key
and the pass runs again; a matching key reuses the file.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch

from mixpo.files import atomic_output, load_tensors
from mixpo.hf.policy import pair_logps
from mixpo.train import distributed

CACHE_NAME = "reference_logps.pt"


def _model_fingerprint(model_path: str) -> dict:
    path = Path(model_path).resolve()
    files = []
    for item in sorted(path.iterdir()) if path.is_dir() else []:
        if item.suffix in (".safetensors", ".bin", ".pt", ".json") and item.is_file():
            stat = item.stat()
            files.append([item.name, stat.st_size, stat.st_mtime_ns])
    config_file = path / "config.json"
    config = config_file.read_text(encoding="utf-8") if config_file.is_file() else ""
    return {"path": str(path), "config": config, "files": files}


def cache_key(model_path: str, dtype: torch.dtype, examples: list[dict],
              ld_alpha: float | None = None) -> str:
    """sha256 over the model fingerprint, dtype, LD-DPO weighting and every tokenized pair:
    also the run's data fingerprint (a resumed run must see the same)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"model": _model_fingerprint(model_path), "dtype": str(dtype),
                              "ld_alpha": ld_alpha}, sort_keys=True).encode())
    for example in examples:
        for name in ("chosen_input_ids", "rejected_input_ids"):
            ids = np.asarray(example[name], dtype=np.int64)
            digest.update(np.int64(len(ids)).tobytes())
            digest.update(ids.tobytes())
        digest.update(np.int64(example["prompt_length"]).tobytes())
    return digest.hexdigest()


@torch.no_grad()
def compute_reference_logps(model, examples: list[dict], collator, env, batch_size: int,
                            progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of every pair under `model` (a PreferenceModel, possibly
    FSDP-sharded): (chosen [N], rejected [N]) fp32 on the CPU, identical on every rank.

    Rounds of `batch_size` pairs per rank; every rank runs every round (FSDP's collectives
    need all ranks), a rank whose slice is empty re-scores pair 0 and discards it.
    """
    from tqdm.auto import tqdm

    count = len(examples)
    per_round = batch_size * env.world_size
    results = []
    rounds = range(0, count, per_round)
    for start in tqdm(rounds, desc="reference log-probs", disable=not (progress and env.is_main)):
        first = start + env.rank * batch_size
        indices = list(range(first, min(first + batch_size, count)))
        chosen, rejected = pair_logps(model, [examples[i] for i in (indices or [0])], collator,
                                      env.device)
        if indices:
            results.append((indices, chosen.tolist(), rejected.tolist()))
    if hasattr(model, "reshard"):
        # FSDP2 keeps the root unit unsharded after a forward without backward; reshard it so
        # the optimizer and the training forward see the sharded parameters again.
        model.reshard()
    chosen, rejected = torch.zeros(count), torch.zeros(count)
    for rank_results in distributed.all_gather_objects(results, env):
        for indices, chosen_values, rejected_values in rank_results:
            chosen[indices] = torch.tensor(chosen_values)
            rejected[indices] = torch.tensor(rejected_values)
    return chosen, rejected


def attach_reference_logps(examples: list[dict], model, collator, env, *, key: str,
                           output_dir: Path, batch_size: int, progress: bool = False,
                           cache_name: str = CACHE_NAME) -> str:
    """Set `ref_chosen_logps` / `ref_rejected_logps` on every example, from the cache when its
    `key` (`cache_key`) matches, else by `compute_reference_logps` (then cached by rank 0,
    atomically). A damaged cache file is recomputed. Returns 'cached' or 'computed'."""
    path = Path(output_dir) / cache_name
    cached = None
    if env.is_main and path.is_file():
        try:
            stored = load_tensors(path)
        except Exception:               # noqa: BLE001 - a cache (damaged or crafted): recompute
            warnings.warn(f"{path} is damaged; computing the reference log-probs again",
                          stacklevel=2)
            stored = {}
        if stored.get("key") == key and len(stored.get("chosen", ())) == len(examples):
            cached = (stored["chosen"], stored["rejected"])
    cached = distributed.broadcast_object(cached, env)  # only rank 0 reads the file
    if cached is None:
        chosen, rejected = compute_reference_logps(model, examples, collator, env, batch_size,
                                                   progress)
        if env.is_main:
            with atomic_output(path) as staging:
                torch.save({"key": key, "chosen": chosen, "rejected": rejected}, staging)
        origin = "computed"
    else:
        chosen, rejected = cached
        origin = "cached"
    for example, chosen_logp, rejected_logp in zip(examples, chosen.tolist(), rejected.tolist()):
        example["ref_chosen_logps"] = chosen_logp
        example["ref_rejected_logps"] = rejected_logp
    return origin
