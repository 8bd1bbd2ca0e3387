"""nn.Module wrappers over the loss API (Liger-style layering: kernels -> functional ->
modules). A module holds one `LossConfig`, built and validated by its constructor;
`LinearPreferenceLoss` takes the LM head as an argument of forward so that, under FSDP, the
head's weight is read inside a module forward (where FSDP has unsharded it)."""
from __future__ import annotations

import torch

from mixpo.kernels.dispatch import check_backend
from mixpo.loss_config import LossConfig
from mixpo.losses import linear_loss, logits_loss


class PreferenceLoss(torch.nn.Module):
    """`mixpo.preference_loss` as a module: `PreferenceLoss(beta=0.1)(logits, labels, ...)`.

    Constructor arguments are the loss hyper-parameters (see `mixpo.preference_loss`);
    forward takes the per-batch tensors: logits [2B, T, V], labels [2B, T], ref_logps [2B],
    hard [B], gamma [B] (overrides the fixed gamma), margin (a `mixpo.AdaptiveMargin`).
    """

    def __init__(self, loss_type: str = "sigmoid", beta: float = 0.1, gamma: float = 0.0,
                 label_smoothing: float = 0.0, average_log_prob: bool = False,
                 sft_weight: float = 0.0, ignore_index: int = -100, backend: str = "auto",
                 inplace_backward: bool = False):
        super().__init__()
        self.config = LossConfig(loss_type=loss_type, beta=beta, gamma=gamma,
                                 label_smoothing=label_smoothing,
                                 average_log_prob=average_log_prob, sft_weight=sft_weight,
                                 ignore_index=ignore_index)
        self.backend, self.inplace_backward = check_backend(backend), inplace_backward

    def forward(self, logits, labels, ref_logps=None, hard=None, gamma=None, margin=None):
        return logits_loss(logits, labels, self.config, ref_logps=ref_logps, hard=hard,
                           gamma=gamma, margin=margin, backend=self.backend,
                           inplace_backward=self.inplace_backward)

    def extra_repr(self) -> str:
        return repr(self.config)


class LinearPreferenceLoss(torch.nn.Module):
    """`mixpo.linear_preference_loss` on an `nn.Linear` LM head (logit-free):
    `LinearPreferenceLoss(loss_type="simpo", beta=2.0)(hidden, lm_head, labels, ...)`.

    Same constructor arguments as `PreferenceLoss` (no in-place option: there are no logits);
    forward(hidden [2B, T, H], lm_head, labels [2B, T], ref_logps, hard, gamma, margin).
    """

    def __init__(self, loss_type: str = "sigmoid", beta: float = 0.1, gamma: float = 0.0,
                 label_smoothing: float = 0.0, average_log_prob: bool = False,
                 sft_weight: float = 0.0, ignore_index: int = -100, backend: str = "auto"):
        super().__init__()
        self.config = LossConfig(loss_type=loss_type, beta=beta, gamma=gamma,
                                 label_smoothing=label_smoothing,
                                 average_log_prob=average_log_prob, sft_weight=sft_weight,
                                 ignore_index=ignore_index)
        self.backend = check_backend(backend)

    def forward(self, hidden, lm_head: torch.nn.Linear, labels, ref_logps=None, hard=None,
                gamma=None, margin=None):
        return linear_loss(hidden, lm_head.weight, labels, self.config, bias=lm_head.bias,
                           ref_logps=ref_logps, hard=hard, gamma=gamma, margin=margin,
                           backend=self.backend)

    def extra_repr(self) -> str:
        return repr(self.config)
