"""`mixpo export CHECKPOINT -o DIR`: an intermediate checkpoint as a Hugging Face model
directory (safetensors + tokenizer), loadable by AutoModelForCausalLM.from_pretrained.

Checkpoints keep the model in torch.distributed.checkpoint format (sharded under FSDP2, with
the optimizer), which resumes exactly but which transformers cannot read; this rebuilds the
run's model from its recorded config on one process and writes it out. `OUTPUT/final/` is
already in Hugging Face format.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from mixpo.files import check_replaceable, check_writable
from mixpo.hf.loading import load_tokenizer
from mixpo.train import checkpoint, distributed, safe_dcp
from mixpo.train.config import TrainConfig, canonical_config_dict

OWNER = "mixpo export"


def export_checkpoint(checkpoint_dir: str | Path, target: str | Path,
                      device: str = "cpu") -> Path:
    """Write checkpoint `checkpoint_dir`'s model as a Hugging Face directory at `target`."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from mixpo.train.trainer import build_policy

    checkpoint_dir, target = Path(checkpoint_dir), Path(target)
    if not (checkpoint_dir / "trainer_state.pt").is_file():
        raise FileNotFoundError(f"{checkpoint_dir}: not a mixpo checkpoint directory (no "
                                "trainer_state.pt)")
    check_replaceable(target, OWNER)  # before the model is built
    check_writable(target)
    broken = checkpoint.damaged_file(checkpoint_dir, 0)
    if broken:
        raise ValueError(f"{checkpoint_dir}: {broken} is damaged or truncated")
    state = checkpoint.load_trainer_state(checkpoint_dir)
    known = {item.name for item in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in canonical_config_dict(state["config"]).items() if k in known}
    cfg = TrainConfig(**{**values, "device": device, "gradient_checkpointing": False})
    env = distributed.DistributedEnv(0, 1, 0, distributed.resolve_device(device))
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    policy = build_policy(cfg, env)
    model_state = get_model_state_dict(policy)
    safe_dcp.load({"model": model_state}, checkpoint_dir / "state")
    set_model_state_dict(policy, model_state)
    return checkpoint.export_model(target, policy, policy.causal_lm, tokenizer,
                                   {"exported_from": str(checkpoint_dir), "step": state["step"],
                                    "config": state["config"]}, env, OWNER)
