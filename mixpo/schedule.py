"""The learning-rate schedules, by Hugging Face's names: one definition for the trainer and
for Selective DPO's reference models (`mixpo.scoring.validation`). Stateless (the rate of a
step is a function of the step), so a resumed run needs no scheduler state; each formula
equals transformers' `get_*_schedule_with_warmup` (tested)."""
from __future__ import annotations

import math

SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


def cosine_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup from 0, then cosine to 0
    (Hugging Face's get_cosine_schedule_with_warmup)."""
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def learning_rate_at(schedule: str, step: int, total_steps: int, warmup_steps: int,
                     base_lr: float) -> float:
    """The learning rate of step `step` (0-based) under Hugging Face's schedules with linear
    warmup: "cosine" (get_cosine_schedule_with_warmup), "linear" (to 0 at the end),
    "constant" (no warmup), "constant_with_warmup"."""
    if schedule == "cosine":
        return cosine_lr(step, total_steps, warmup_steps, base_lr)
    if schedule == "constant":
        return base_lr
    if step < warmup_steps:
        return base_lr * step / max(1, warmup_steps)
    if schedule == "constant_with_warmup":
        return base_lr
    if schedule == "linear":
        return base_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    raise ValueError(f"lr_scheduler_type {schedule!r} is not one of {', '.join(SCHEDULERS)}")


def set_lr(optimizers: list, lr: float) -> None:
    """Every parameter group of every optimizer at learning rate `lr`."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if hasattr(group["lr"], "fill_"):   # a tensor lr (torchao's optimizers) stays one
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
