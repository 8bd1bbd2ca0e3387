"""Argument checks of the loss API: each raises ValueError naming the argument, before any
kernel runs. (The label and finiteness checks read their tensors on the host: the trainer,
which checks its batches on the CPU, skips them with `validate=False`; so does tracing, on
fake tensors or under torch.compile, where there are no values to read.)"""
from __future__ import annotations

import math

import torch

from mixpo.kernels.dispatch import tracing

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_labels(labels, expected_shape, vocab_size, ignore_index, device, name_of_rows):
    if not isinstance(labels, torch.Tensor):
        raise ValueError("labels must be a torch.Tensor")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(expected_shape):
        raise ValueError(f"labels must have shape {tuple(expected_shape)} to match "
                         f"{name_of_rows}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels is on {labels.device}, {name_of_rows} on {device}")
    labels = labels.long()
    completion = labels != ignore_index
    if tracing(labels):
        return labels, completion.sum(dim=1).float()
    if ((labels < 0) | (labels >= vocab_size))[completion].any():
        raise ValueError(f"labels must be in [0, {vocab_size}) or ignore_index={ignore_index}")
    counts = completion.sum(dim=1)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(f"labels: sequence(s) {empty[:8]} have no completion token "
                         f"(every label is ignore_index)")
    return labels, counts.float()


def check_float_tensor(name, tensor, device):
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")


def check_pair_count(name, tensor, last_dim, paired=True):
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
        raise ValueError(f"{name} must be a tensor of shape [2B, T, {last_dim}]")
    if paired and (tensor.shape[0] % 2 or tensor.shape[0] == 0):
        raise ValueError(f"{name} must have an even, non-zero number of rows (chosen then "
                         f"rejected), got {tensor.shape[0]}")


def pair_vector(name, value, length, device):
    """A per-pair (or per-sequence) float vector as fp32 on `device`, checked finite."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        return torch.full((length,), float(value), dtype=torch.float32, device=device)
    if not isinstance(value, torch.Tensor) or value.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise ValueError(f"{name} must be a float or a float tensor of shape [{length}]")
    if tuple(value.shape) != (length,):
        raise ValueError(f"{name} must have shape [{length}], got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device}, expected {device}")
    value = value.detach().float()
    if not tracing(value) and not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or inf")
    return value.contiguous()


def check_hard(hard, num_pairs, device):
    if hard is None:
        return None
    if not isinstance(hard, torch.Tensor) or tuple(hard.shape) != (num_pairs,):
        raise ValueError(f"hard must be a bool tensor of shape [{num_pairs}]")
    if hard.device != device:
        raise ValueError(f"hard is on {hard.device}, expected {device}")
    if hard.dtype != torch.bool:
        if hard.dtype.is_floating_point or not tracing(hard) and not ((hard == 0)
                                                                      | (hard == 1)).all():
            raise ValueError(f"hard must be a bool tensor (or 0/1 ints), got {hard.dtype}")
        hard = hard.bool()
    return hard


def check_finite_logps(seq_logps, inputs: dict):
    """NaN/inf in the inputs surface as non-finite sequence log-probs: one [S] check. Only
    when it fails are the inputs ({name: tensor or None}) searched for the culprit. Nothing
    to check while tracing."""
    if tracing(seq_logps):
        return
    bad = torch.nonzero(~torch.isfinite(seq_logps.detach())).flatten().tolist()
    if not bad:
        return
    for name, tensor in inputs.items():
        if tensor is not None and not torch.isfinite(tensor.detach()).all():
            raise ValueError(f"{name} contains NaN or inf (non-finite log-probs for "
                             f"sequence(s) {bad[:8]})")
    raise ValueError(f"non-finite log-probs for sequence(s) {bad[:8]}: a label's logit is -inf "
                     "or the logits overflow")


def check_linear_inputs(hidden, weight, bias, labels, ignore_index, paired):
    check_pair_count("hidden", hidden, "H", paired)
    check_float_tensor("hidden", hidden, hidden.device)
    check_float_tensor("weight", weight, hidden.device)
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must have shape [V, {hidden.shape[2]}], "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if bias is not None:
        check_float_tensor("bias", bias, hidden.device)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    return check_labels(labels, hidden.shape[:2], weight.shape[0], ignore_index,
                         hidden.device, "hidden")
