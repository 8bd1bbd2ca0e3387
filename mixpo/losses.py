"""Public loss API: argument checks and the functional front ends over `mixpo.functions`.

    preference_loss(logits, labels, ...)          fused loss over materialised logits
    linear_preference_loss(hidden, weight, ...)   logit-free: no [tokens x vocab] logits ever
    sequence_logps(hidden, weight, labels, ...)   forward-only summed log-probs (reference models)

Each front end checks its tensors (ValueError naming the argument), builds one frozen
`LossConfig` from its keywords, runs stage 1 (sequence log-probs) and hands the result to the
shared per-pair head (stage 2). `backend="triton"` runs `mixpo.kernels`, `"torch"` their
torch twins (the CPU path and the test oracle), `"auto"` picks triton for CUDA tensors
(`mixpo.kernels.dispatch`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from mixpo.functions import LinearSequenceLogps, LogitsSequenceLogps, PairLoss
from mixpo.kernels.dispatch import use_triton
from mixpo.loss_config import LossConfig
from mixpo.loss_spec import sequence_rewards
from mixpo.margins import AdaptiveMargin

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class PreferenceLossOutput:
    """Result of a preference loss. `loss` is differentiable; every other field is detached.

    loss: scalar, mean of per_pair_loss over pairs.
    per_pair_loss [B]; chosen_logps / rejected_logps [B]: summed completion log-probs;
    chosen_rewards / rejected_rewards [B]: beta * (logp - ref), per token for ipo/simpo or
    average_log_prob; gamma [B]: the target margin each pair used; hard [B] bool or None.
    """
    loss: torch.Tensor
    per_pair_loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    gamma: torch.Tensor
    hard: Optional[torch.Tensor] = None

    def metrics(self) -> dict:
        """TRL-named scalar metrics plus gamma and routing statistics (floats)."""
        margins = self.chosen_rewards - self.rejected_rewards
        stats = {
            "loss": self.loss.item(),
            "rewards/chosen": self.chosen_rewards.mean().item(),
            "rewards/rejected": self.rejected_rewards.mean().item(),
            "rewards/accuracies": (margins > 0).float().mean().item(),
            "rewards/margins": margins.mean().item(),
            "logps/chosen": self.chosen_logps.mean().item(),
            "logps/rejected": self.rejected_logps.mean().item(),
            "gamma/mean": self.gamma.mean().item(),
            "gamma/std": self.gamma.std(unbiased=False).item(),
        }
        stats["routing/sft_fraction"] = 0.0 if self.hard is None else \
            self.hard.float().mean().item()
        return stats


# ----------------------------------------------------------------------------------------------
# Argument checks (ValueError naming the argument)
# ----------------------------------------------------------------------------------------------
def _check_labels(labels, expected_shape, vocab_size, ignore_index, device, name_of_rows):
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
    if ((labels < 0) | (labels >= vocab_size))[completion].any():
        raise ValueError(f"labels must be in [0, {vocab_size}) or ignore_index={ignore_index}")
    counts = completion.sum(dim=1)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        raise ValueError(f"labels: sequence(s) {empty[:8]} have no completion token "
                         f"(every label is ignore_index)")
    return labels, counts.float()


def _check_float_tensor(name, tensor, device):
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")


def _check_pair_count(name, tensor, last_dim, paired=True):
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
        raise ValueError(f"{name} must be a tensor of shape [2B, T, {last_dim}]")
    if paired and (tensor.shape[0] % 2 or tensor.shape[0] == 0):
        raise ValueError(f"{name} must have an even, non-zero number of rows (chosen then "
                         f"rejected), got {tensor.shape[0]}")


def _pair_vector(name, value, length, device):
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
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or inf")
    return value.contiguous()


def _check_hard(hard, num_pairs, device):
    if hard is None:
        return None
    if not isinstance(hard, torch.Tensor) or tuple(hard.shape) != (num_pairs,):
        raise ValueError(f"hard must be a bool tensor of shape [{num_pairs}]")
    if hard.device != device:
        raise ValueError(f"hard is on {hard.device}, expected {device}")
    if hard.dtype != torch.bool:
        if hard.dtype.is_floating_point or not ((hard == 0) | (hard == 1)).all():
            raise ValueError(f"hard must be a bool tensor (or 0/1 ints), got {hard.dtype}")
        hard = hard.bool()
    return hard


def _check_finite_logps(seq_logps, input_name):
    """NaN/inf in the inputs surface as non-finite sequence log-probs: one [S] check."""
    bad = torch.nonzero(~torch.isfinite(seq_logps.detach())).flatten().tolist()
    if bad:
        raise ValueError(f"{input_name} produced non-finite log-probs for sequence(s) "
                         f"{bad[:8]}: the input contains NaN/inf or the label's logit is -inf")


def _loss_config(loss_type, beta, gamma, label_smoothing, average_log_prob, sft_weight,
                 ignore_index) -> LossConfig:
    """The keywords of a functional call as a LossConfig; a tensor gamma is per call."""
    fixed_gamma = 0.0 if isinstance(gamma, torch.Tensor) else gamma
    return LossConfig(loss_type=loss_type, beta=beta, gamma=fixed_gamma,
                      label_smoothing=label_smoothing, average_log_prob=average_log_prob,
                      sft_weight=sft_weight, ignore_index=ignore_index)


# ----------------------------------------------------------------------------------------------
# Stage 2, shared by both front ends
# ----------------------------------------------------------------------------------------------
def _pair_gamma(config, gamma, margin, seq_logps, counts, ref_logps, num_pairs):
    """The [B] target margins: `margin`'s adaptive solve, a per-pair tensor, or the fixed
    `config.gamma`."""
    if margin is None:
        return _pair_vector("gamma", config.gamma if gamma is None else gamma, num_pairs,
                            seq_logps.device)
    if not isinstance(margin, AdaptiveMargin):
        raise ValueError("margin must be a mixpo.AdaptiveMargin")
    if gamma is not None or config.gamma != 0:
        raise ValueError("pass either gamma or margin, not both")
    rewards, _ = sequence_rewards(seq_logps.detach(), counts, ref_logps, config.beta,
                                  config.normalized)
    return margin(rewards[:num_pairs] - rewards[num_pairs:])


def pair_head(seq_logps, counts, config: LossConfig, *, ref_logps=None, hard=None, gamma=None,
              margin=None, backend="auto", input_name="logps") -> "PreferenceLossOutput":
    """Stage 2 on summed sequence log-probs [2B] (differentiable) and completion counts [2B]:
    checks the per-pair inputs, resolves gamma, runs the epilogue, builds the output."""
    device, num_pairs = seq_logps.device, seq_logps.shape[0] // 2
    _check_finite_logps(seq_logps, input_name)
    if ref_logps is not None:
        if config.reference_free:
            raise ValueError(f"ref_logps must be None for loss_type={config.loss_type!r} "
                             "(reference-free)")
        ref_logps = _pair_vector("ref_logps", ref_logps, 2 * num_pairs, device)
    hard = _check_hard(hard, num_pairs, device)
    gamma = _pair_gamma(config, gamma, margin, seq_logps, counts, ref_logps, num_pairs)
    per_pair_loss, chosen_rewards, rejected_rewards = PairLoss.apply(
        seq_logps, counts, ref_logps, hard, gamma, config, use_triton(backend, seq_logps))
    detached = seq_logps.detach()
    return PreferenceLossOutput(
        loss=per_pair_loss.mean(), per_pair_loss=per_pair_loss.detach(),
        chosen_logps=detached[:num_pairs], rejected_logps=detached[num_pairs:],
        chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, gamma=gamma,
        hard=hard)


# ----------------------------------------------------------------------------------------------
# Front ends
# ----------------------------------------------------------------------------------------------
def logits_loss(logits, labels, config: LossConfig, *, ref_logps=None, hard=None, gamma=None,
                margin=None, backend="auto", inplace_backward=False):
    """`preference_loss` with its hyper-parameters as one LossConfig (what PreferenceLoss calls)."""
    _check_pair_count("logits", logits, "V")
    _check_float_tensor("logits", logits, logits.device)
    if logits.stride(-1) != 1:
        raise ValueError("logits must be contiguous in its last (vocab) dimension")
    labels, counts = _check_labels(labels, logits.shape[:2], logits.shape[2],
                                   config.ignore_index, logits.device, "logits")
    seq_logps = LogitsSequenceLogps.apply(logits, labels, config.ignore_index,
                                          use_triton(backend, logits), inplace_backward)
    return pair_head(seq_logps, counts, config, ref_logps=ref_logps, hard=hard, gamma=gamma,
                     margin=margin, backend=backend, input_name="logits")


def preference_loss(logits, labels, *, ref_logps=None, loss_type="sigmoid", beta=0.1, gamma=0.0,
                    label_smoothing=0.0, average_log_prob=False, hard=None, sft_weight=0.0,
                    margin=None, ignore_index=-100, backend="auto", inplace_backward=False):
    """Fused preference loss over LM-head logits: one read of the logits in forward.

    Args:
        logits: [2B, T, V] fp32/bf16/fp16 (last dim contiguous); rows 0..B-1 are the chosen
            responses, rows B..2B-1 the rejected responses of the same pairs.
        labels: [2B, T] integer, aligned with positions (`labels[i, t]` is the token whose
            log-prob is read at position t; see `shift_labels`); `ignore_index` marks prompt
            and padding. Every sequence needs at least one completion token.
        ref_logps: [2B] summed reference log-probs, or None for a reference-free loss.
        loss_type: "sigmoid" (DPO, cDPO with label_smoothing), "ipo" (per-token normalised
            log-ratios, TRL's definition), "hinge", "robust" (rDPO), "simpo" (reference-free,
            length-averaged).
        beta: inverse temperature; gamma: target margin, float or [B] tensor, inside the
            loss as z = beta * h - gamma.
        label_smoothing: cDPO / rDPO epsilon in [0, 0.5).
        average_log_prob: use per-token-averaged log-ratios (gamma-DPO's default).
        hard: [B] bool, MixDPO routing: these pairs take the token-mean NLL of the chosen
            response instead (their rejected response gets no gradient).
        sft_weight: adds sft_weight * token-mean NLL of the chosen response to every pair.
        margin: a `mixpo.AdaptiveMargin` (gamma-PO); it receives the batch's reward gaps and
            supplies a per-pair gamma (exclusive with `gamma`).
        backend: "auto" | "triton" | "torch".
        inplace_backward: the backward writes d loss / d logits into `logits` itself
            (flash-attention style): no second [N, V] buffer, and `logits` is consumed.

    Returns a `PreferenceLossOutput`; only `.loss` carries gradient (to `logits`).
    """
    config = _loss_config(loss_type, beta, gamma, label_smoothing, average_log_prob, sft_weight,
                          ignore_index)
    return logits_loss(logits, labels, config, ref_logps=ref_logps, hard=hard,
                       gamma=gamma if isinstance(gamma, torch.Tensor) else None, margin=margin,
                       backend=backend, inplace_backward=inplace_backward)


def _check_linear_inputs(hidden, weight, bias, labels, ignore_index, paired):
    _check_pair_count("hidden", hidden, "H", paired)
    _check_float_tensor("hidden", hidden, hidden.device)
    _check_float_tensor("weight", weight, hidden.device)
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must have shape [V, {hidden.shape[2]}], "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if bias is not None:
        _check_float_tensor("bias", bias, hidden.device)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    return _check_labels(labels, hidden.shape[:2], weight.shape[0], ignore_index,
                         hidden.device, "hidden")


def linear_loss(hidden, weight, labels, config: LossConfig, *, bias=None, ref_logps=None,
                hard=None, gamma=None, margin=None, backend="auto"):
    """`linear_preference_loss` with its hyper-parameters as one LossConfig (what
    LinearPreferenceLoss calls)."""
    labels, counts = _check_linear_inputs(hidden, weight, bias, labels, config.ignore_index,
                                          True)
    seq_logps = LinearSequenceLogps.apply(hidden, weight, bias, labels, config.ignore_index,
                                          use_triton(backend, hidden))
    return pair_head(seq_logps, counts, config, ref_logps=ref_logps, hard=hard, gamma=gamma,
                     margin=margin, backend=backend, input_name="hidden")


def linear_preference_loss(hidden, weight, labels, *, bias=None, ref_logps=None,
                           loss_type="sigmoid", beta=0.1, gamma=0.0, label_smoothing=0.0,
                           average_log_prob=False, hard=None, sft_weight=0.0, margin=None,
                           ignore_index=-100, backend="auto"):
    """Logit-free fused preference loss: the [tokens x vocab] logits never exist.

    hidden [2B, T, H] (the model body's last hidden states, chosen rows first), weight [V, H]
    (lm_head weight, possibly tied to the embedding), bias [V] or None; every other keyword
    as in `preference_loss`. Prompt and padding tokens (labels == ignore_index) are compacted
    away before any matmul. Gradients flow to hidden, weight and bias.
    """
    config = _loss_config(loss_type, beta, gamma, label_smoothing, average_log_prob, sft_weight,
                          ignore_index)
    return linear_loss(hidden, weight, labels, config, bias=bias, ref_logps=ref_logps, hard=hard,
                       gamma=gamma if isinstance(gamma, torch.Tensor) else None, margin=margin,
                       backend=backend)


@torch.no_grad()
def sequence_logps(hidden, weight, labels, *, bias=None, average=False, ignore_index=-100,
                   backend="auto"):
    """Summed (or, with average=True, token-mean) completion log-probs per sequence, [S] fp32.

    Forward only and logit-free: for reference models and for precomputing reference
    log-probs over a dataset. hidden [S, T, H] (any S), weight [V, H], labels [S, T].
    """
    labels, counts = _check_linear_inputs(hidden, weight, bias, labels, ignore_index, False)
    seq_logps = LinearSequenceLogps.apply(hidden, weight, bias, labels, ignore_index,
                                          use_triton(backend, hidden))
    _check_finite_logps(seq_logps, "hidden")
    return seq_logps / counts if average else seq_logps


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """HF-style labels (label t = token t) -> position-aligned labels (label t = token t+1).

    The last position gets ignore_index, so logits[:, t] pairs with shifted[:, t].
    """
    if not isinstance(labels, torch.Tensor) or labels.ndim != 2:
        raise ValueError(f"labels must be a [S, T] tensor, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else labels!r}")
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    return shifted
