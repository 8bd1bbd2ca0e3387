"""Public loss API: autograd Functions, functional wrappers and backend dispatch.

Two stages, each its own autograd Function so that either front end can feed the shared
per-pair epilogue:

1. summed completion log-prob of every sequence, [S] fp32:
   - from materialised logits [S, T, V]   (`_LogitsSequenceLogps`, one read in forward, one
     read + write in backward, optionally in place);
   - from hidden states and the LM-head weight, never materialising logits
     (`_LinearSequenceLogps`, the logit-free path; ignored tokens are compacted away);
2. the per-pair epilogue on [B]-sized data (`_PairLoss`): loss type, target margin gamma,
   MixDPO routing, SFT weight; its backward hands d loss / d logp per sequence to stage 1.

`backend="triton"` runs `mixpo.kernels`, `"torch"` runs `mixpo.reference` (the CPU path and
the test oracle), `"auto"` picks triton for CUDA tensors.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Optional

import torch

from mixpo import reference
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
# Backend dispatch
# ----------------------------------------------------------------------------------------------
def _use_triton(backend: str, tensor: torch.Tensor) -> bool:
    if backend == "auto":
        return tensor.is_cuda
    if backend == "triton":
        return True
    if backend == "torch":
        return False
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")


def _ops(use_triton: bool, kernel_module: str):
    """The module implementing a stage: mixpo.kernels.<kernel_module>, or its torch twins in
    mixpo.reference (same function names and signatures)."""
    if use_triton:  # imported lazily: TRITON_INTERPRET must be decided before kernels load
        return importlib.import_module(f"mixpo.kernels.{kernel_module}")
    return reference


# ----------------------------------------------------------------------------------------------
# Stage 1: sequence log-probs
# ----------------------------------------------------------------------------------------------
class _LogitsSequenceLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, use_triton, inplace_backward):
        ops = _ops(use_triton, "logits_logps")
        token_logps, lse = ops.token_logps_forward(logits, labels, ignore_index)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index, ctx.use_triton, ctx.inplace = ignore_index, use_triton, inplace_backward
        return token_logps.sum(dim=1)

    @staticmethod
    def backward(ctx, grad_seq):
        logits, labels, lse = ctx.saved_tensors
        ops = _ops(ctx.use_triton, "logits_logps")
        dlogits = ops.token_logps_backward(logits, labels, lse, grad_seq.float().contiguous(),
                                           ctx.ignore_index, inplace=ctx.inplace)
        return dlogits, None, None, None, None


class _LinearSequenceLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, use_triton):
        num_seqs, seq_len, hidden_size = hidden.shape
        hidden2d = hidden.reshape(num_seqs * seq_len, hidden_size)
        flat_labels = labels.reshape(-1)
        # Compact the completion tokens: prompt and padding never reach a matmul.
        rows = torch.nonzero(flat_labels != ignore_index).squeeze(1)
        row_labels = flat_labels[rows]
        token_logps, lse = _ops(use_triton, "linear_logps").linear_token_logps_forward(
            hidden2d, weight, bias, row_labels, rows)
        seq_of_row = torch.div(rows, seq_len, rounding_mode="floor")
        seq_logps = torch.zeros(num_seqs, dtype=torch.float32, device=hidden.device)
        seq_logps.index_add_(0, seq_of_row, token_logps)
        ctx.save_for_backward(hidden, weight, bias, row_labels, rows, lse)
        ctx.use_triton, ctx.seq_len = use_triton, seq_len
        return seq_logps

    @staticmethod
    def backward(ctx, grad_seq):
        hidden, weight, bias, row_labels, rows, lse = ctx.saved_tensors
        grad_token = grad_seq.float()[torch.div(rows, ctx.seq_len, rounding_mode="floor")]
        hidden2d = hidden.reshape(-1, hidden.shape[-1])
        dhidden, dweight, dbias = _ops(ctx.use_triton, "linear_logps").linear_token_logps_backward(
            hidden2d, weight, bias, row_labels, rows, lse, grad_token.contiguous())
        return (dhidden.view_as(hidden), dweight if ctx.needs_input_grad[1] else None,
                dbias if ctx.needs_input_grad[2] else None, None, None, None)


# ----------------------------------------------------------------------------------------------
# Stage 2: the per-pair epilogue
# ----------------------------------------------------------------------------------------------
class _PairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logps, counts, ref_logps, hard, gamma, config, use_triton):
        out = _ops(use_triton, "pair_loss").pair_loss(logps, counts, ref_logps, hard, gamma, **config)
        ctx.save_for_backward(out["d_chosen"], out["d_rejected"])
        ctx.mark_non_differentiable(out["chosen_rewards"], out["rejected_rewards"])
        return out["per_pair_loss"], out["chosen_rewards"], out["rejected_rewards"]

    @staticmethod
    def backward(ctx, grad_pair, _grad_chosen_rewards, _grad_rejected_rewards):
        d_chosen, d_rejected = ctx.saved_tensors
        grad_logps = torch.cat([grad_pair * d_chosen, grad_pair * d_rejected])
        return grad_logps, None, None, None, None, None, None


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


def _pair_vector(name, value, num_pairs, device, length=None):
    """A per-pair (or per-sequence) float vector as fp32 on `device`, checked finite."""
    length = num_pairs if length is None else length
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


def _pair_config(loss_type, beta, label_smoothing, average_log_prob, sft_weight, ref_logps):
    if loss_type not in reference.LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {reference.LOSS_TYPES}, got {loss_type!r}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite float > 0, got {beta!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0 <= label_smoothing < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss_type in ("ipo", "hinge"):
        raise ValueError(f"label_smoothing is not defined for loss_type={loss_type!r}")
    if not (isinstance(sft_weight, (int, float)) and math.isfinite(sft_weight)
            and sft_weight >= 0):
        raise ValueError(f"sft_weight must be a finite float >= 0, got {sft_weight!r}")
    if loss_type == "simpo" and ref_logps is not None:
        raise ValueError("ref_logps must be None for loss_type='simpo' (reference-free)")
    return {"loss_type": loss_type, "beta": float(beta),
            "label_smoothing": float(label_smoothing),
            "average_log_prob": bool(average_log_prob), "sft_weight": float(sft_weight)}


def _check_finite_logps(seq_logps, input_name):
    """NaN/inf in the inputs surface as non-finite sequence log-probs: one [S] check."""
    bad = torch.nonzero(~torch.isfinite(seq_logps.detach())).flatten().tolist()
    if bad:
        raise ValueError(f"{input_name} produced non-finite log-probs for sequence(s) "
                         f"{bad[:8]}: the input contains NaN/inf or the label's logit is -inf")


def _pair_head(seq_logps, counts, *, input_name, ref_logps, loss_type, beta, gamma,
               label_smoothing, average_log_prob, hard, sft_weight, margin, backend):
    """Shared by both front ends: checks, gamma (fixed or adaptive), the epilogue."""
    device = seq_logps.device
    num_pairs = seq_logps.shape[0] // 2
    config = _pair_config(loss_type, beta, label_smoothing, average_log_prob, sft_weight,
                          ref_logps)
    _check_finite_logps(seq_logps, input_name)
    if ref_logps is not None:
        ref_logps = _pair_vector("ref_logps", ref_logps, num_pairs, device, 2 * num_pairs)
    if hard is not None:
        if not isinstance(hard, torch.Tensor) or tuple(hard.shape) != (num_pairs,):
            raise ValueError(f"hard must be a bool tensor of shape [{num_pairs}]")
        if hard.device != device:
            raise ValueError(f"hard is on {hard.device}, expected {device}")
        if hard.dtype != torch.bool:
            if hard.dtype.is_floating_point or not ((hard == 0) | (hard == 1)).all():
                raise ValueError(f"hard must be a bool tensor (or 0/1 ints), got {hard.dtype}")
            hard = hard.bool()
    use_triton = _use_triton(backend, seq_logps)
    if margin is not None:
        if not isinstance(margin, AdaptiveMargin):
            raise ValueError("margin must be a mixpo.AdaptiveMargin")
        if isinstance(gamma, torch.Tensor) or gamma != 0:
            raise ValueError("pass either gamma or margin, not both")
        rewards, _ = reference.sequence_rewards(
            seq_logps.detach(), counts, ref_logps, config["beta"],
            reference.normalizes_length(loss_type, average_log_prob))
        gamma = margin(rewards[:num_pairs] - rewards[num_pairs:])
    gamma = _pair_vector("gamma", gamma, num_pairs, device)
    per_pair_loss, chosen_rewards, rejected_rewards = _PairLoss.apply(
        seq_logps, counts, ref_logps, hard, gamma, config, use_triton)
    detached = seq_logps.detach()
    return PreferenceLossOutput(
        loss=per_pair_loss.mean(), per_pair_loss=per_pair_loss.detach(),
        chosen_logps=detached[:num_pairs], rejected_logps=detached[num_pairs:],
        chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, gamma=gamma,
        hard=hard)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
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
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        raise ValueError("logits must be a tensor of shape [2B, T, V]")
    _check_float_tensor("logits", logits, logits.device)
    if logits.shape[0] % 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must have an even, non-zero number of rows (chosen then "
                         f"rejected), got {logits.shape[0]}")
    if logits.stride(-1) != 1:
        raise ValueError("logits must be contiguous in its last (vocab) dimension")
    labels, counts = _check_labels(labels, logits.shape[:2], logits.shape[2], ignore_index,
                                   logits.device, "logits")
    use_triton = _use_triton(backend, logits)
    seq_logps = _LogitsSequenceLogps.apply(logits, labels, ignore_index, use_triton,
                                           inplace_backward)
    return _pair_head(seq_logps, counts, input_name="logits", ref_logps=ref_logps,
                      loss_type=loss_type, beta=beta, gamma=gamma,
                      label_smoothing=label_smoothing, average_log_prob=average_log_prob,
                      hard=hard, sft_weight=sft_weight, margin=margin, backend=backend)


def _check_linear_inputs(hidden, weight, bias, labels, ignore_index, paired):
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
        raise ValueError("hidden must be a tensor of shape [2B, T, H]")
    _check_float_tensor("hidden", hidden, hidden.device)
    if paired and (hidden.shape[0] % 2 or hidden.shape[0] == 0):
        raise ValueError(f"hidden must have an even, non-zero number of rows (chosen then "
                         f"rejected), got {hidden.shape[0]}")
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
    labels, counts = _check_linear_inputs(hidden, weight, bias, labels, ignore_index, True)
    use_triton = _use_triton(backend, hidden)
    seq_logps = _LinearSequenceLogps.apply(hidden, weight, bias, labels, ignore_index,
                                           use_triton)
    return _pair_head(seq_logps, counts, input_name="hidden", ref_logps=ref_logps,
                      loss_type=loss_type, beta=beta, gamma=gamma,
                      label_smoothing=label_smoothing, average_log_prob=average_log_prob,
                      hard=hard, sft_weight=sft_weight, margin=margin, backend=backend)


@torch.no_grad()
def sequence_logps(hidden, weight, labels, *, bias=None, average=False, ignore_index=-100,
                   backend="auto"):
    """Summed (or, with average=True, token-mean) completion log-probs per sequence, [S] fp32.

    Forward only and logit-free: for reference models and for precomputing reference
    log-probs over a dataset. hidden [S, T, H] (any S), weight [V, H], labels [S, T].
    """
    labels, counts = _check_linear_inputs(hidden, weight, bias, labels, ignore_index, False)
    seq_logps = _LinearSequenceLogps.apply(hidden, weight, bias, labels, ignore_index,
                                           _use_triton(backend, hidden))
    _check_finite_logps(seq_logps, "hidden")
    return seq_logps / counts if average else seq_logps


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """HF-style labels (label t = token t) -> position-aligned labels (label t = token t+1).

    The last position gets ignore_index, so logits[:, t] pairs with shifted[:, t].
    """
    shifted = torch.full_like(labels, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    return shifted
