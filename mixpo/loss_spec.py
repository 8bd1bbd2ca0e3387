"""The loss specification: which loss types exist, how each normalises length, what its rewards
are. The single definition that the kernels, their torch twins, the loss API, the trainer's
config and the command line all read.

Notation (ANCHORS.md): per sequence `logp` = summed completion log-probs, `n` its completion
tokens, `ref` the reference model's `logp`; a loss type that normalises length works on the
per-token log-ratio `(logp - ref) / n`. Rewards are `beta * (logp - ref)`, per token when
normalised, so `z = r_w - r_l - gamma = beta * h - gamma` is the margin every loss type reads.

Imports nothing heavy at module level (the command line reads it to build its parsers); the
functions work on tensors through their methods.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossType:
    """One per-pair loss formula.

    name: the value of `loss_type` (TRL's spelling where TRL has the type).
    kernel_code: LOSS_KIND of the pair-loss kernel (types sharing a formula share a code).
    normalized: per-token log-ratios by default (`average_log_prob=None` follows this).
    reference_free: no reference log-probs (ref_logps must be None).
    label_smoothing: accepts label_smoothing > 0.
    formula / source: documentation (README table, docstrings).
    """
    name: str
    kernel_code: int
    formula: str
    source: str
    normalized: bool = False
    reference_free: bool = False
    label_smoothing: bool = False


LOSS_TYPES: dict[str, LossType] = {spec.name: spec for spec in (
    LossType("sigmoid", 0, "-(1-e) log s(z) - e log s(-z)",
             "DPO (Rafailov et al. 2023); cDPO label smoothing (Mitchell 2023)",
             label_smoothing=True),
    LossType("robust", 1, "(-(1-e) log s(z) + e log s(-z)) / (1 - 2e)",
             "rDPO (Chowdhury et al. 2024)", label_smoothing=True),
    LossType("hinge", 2, "relu(1 - z)", "SLiC-HF (Zhao et al. 2023)"),
    LossType("ipo", 3, "(h - gamma/beta - 1/(2 beta))^2, per-token h (TRL)",
             "IPO (Azar et al. 2023)", normalized=True),
    LossType("simpo", 0, "-(1-e) log s(beta (avg_w - avg_l) - gamma)",
             "SimPO (Meng et al. 2024)", normalized=True, reference_free=True,
             label_smoothing=True),
)}


def loss_type_spec(name: str) -> LossType:
    """The LossType called `name`, or ValueError listing the known ones."""
    if name not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {name!r}")
    return LOSS_TYPES[name]


def normalizes_length(loss_type: str, average_log_prob: bool | None = None) -> bool:
    """Whether `loss_type` works on per-token log-ratios: `average_log_prob` when given,
    else the type's own convention (IPO and SimPO per token, the others summed)."""
    if average_log_prob is None:
        return loss_type_spec(loss_type).normalized
    return bool(average_log_prob) or loss_type_spec(loss_type).normalized


def sequence_rewards(logps, counts, ref_logps, beta: float, normalize: bool):
    """Implicit rewards `beta * (logp - ref)` (per token when `normalize`) and the scale
    d reward / d logp, both [S] fp32 tensors like `logps`."""
    ratio = logps if ref_logps is None else logps - ref_logps
    scale = beta / counts if normalize else logps.new_full(logps.shape, beta)
    return scale * ratio, scale
