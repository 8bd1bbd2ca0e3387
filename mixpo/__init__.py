"""mixpo: difficulty-aware preference optimization (MixDPO, Selective DPO, gamma-PO) with fused
Triton kernels and a logit-free LM-head loss."""
from mixpo.loss_config import LossConfig
from mixpo.losses import (
    PreferenceLossOutput,
    linear_preference_loss,
    preference_loss,
    sequence_logps,
    shift_labels,
)
from mixpo.margins import AdaptiveMargin
from mixpo.modules import LinearPreferenceLoss, PreferenceLoss

__version__ = "0.2.0"

__all__ = [
    "AdaptiveMargin",
    "LossConfig",
    "LinearPreferenceLoss",
    "PreferenceLoss",
    "PreferenceLossOutput",
    "linear_preference_loss",
    "preference_loss",
    "sequence_logps",
    "shift_labels",
]
