"""`LossConfig`: the hyper-parameters of one preference loss, validated once.

Both front ends (`preference_loss` over logits, `linear_preference_loss` logit-free) and the
`nn.Module` wrappers build one frozen `LossConfig` and hand it down; the kernels and their
twins read its fields. Per-call tensors (reference log-probs, routing flags, per-pair
margins) are not part of it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from mixpo.loss_spec import loss_type_spec, normalizes_length


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class LossConfig:
    """loss_type: a name of `mixpo.loss_spec.LOSS_TYPES`.
    beta: inverse temperature (> 0).
    gamma: fixed target margin inside the loss, z = beta * h - gamma (a [B] tensor or an
        adaptive margin can replace it per call).
    label_smoothing: cDPO / rDPO epsilon in [0, 0.5).
    average_log_prob: per-token log-ratios when True (IPO and SimPO always use them).
    sft_weight: adds sft_weight * token-mean NLL of the chosen response to every pair (>= 0).
    ignore_index: the label of prompt and padding positions.
    """
    loss_type: str = "sigmoid"
    beta: float = 0.1
    gamma: float = 0.0
    label_smoothing: float = 0.0
    average_log_prob: bool = False
    sft_weight: float = 0.0
    ignore_index: int = -100

    def __post_init__(self):
        if not isinstance(self.loss_type, str):
            raise ValueError(f"loss_type must be a string, got {self.loss_type!r}")
        spec = loss_type_spec(self.loss_type)
        if not (_finite_number(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite float > 0, got {self.beta!r}")
        if not _finite_number(self.gamma):
            raise ValueError(f"gamma must be finite (a float), got {self.gamma!r}")
        if not (_finite_number(self.label_smoothing) and 0 <= self.label_smoothing < 0.5):
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.label_smoothing and not spec.label_smoothing:
            raise ValueError(f"label_smoothing is not defined for loss_type={self.loss_type!r}")
        if not isinstance(self.average_log_prob, bool):
            raise ValueError(f"average_log_prob must be True or False, "
                             f"got {self.average_log_prob!r}")
        if not (_finite_number(self.sft_weight) and self.sft_weight >= 0):
            raise ValueError(f"sft_weight must be a finite float >= 0, got {self.sft_weight!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {self.ignore_index!r}")
        # Plain floats from here on (ints and numpy scalars were accepted above).
        for name in ("beta", "gamma", "label_smoothing", "sft_weight"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def reference_free(self) -> bool:
        return loss_type_spec(self.loss_type).reference_free

    @property
    def normalized(self) -> bool:
        """Whether rewards and the loss use per-token log-ratios."""
        return normalizes_length(self.loss_type, self.average_log_prob)
