"""nn.Module wrappers over the functional losses (Liger-style layering: kernels -> functional
-> modules). A module holds the loss configuration; `LinearPreferenceLoss` takes the LM head
as an argument of forward so that, under FSDP, the head's weight is read inside a module
forward (where FSDP has unsharded it)."""
from __future__ import annotations

import torch

from mixpo.losses import linear_preference_loss, preference_loss


class PreferenceLoss(torch.nn.Module):
    """`preference_loss` with fixed keywords: `PreferenceLoss(beta=0.1)(logits, labels, ...)`.

    Keywords given to forward override those given to the constructor.
    """

    def __init__(self, **loss_kwargs):
        super().__init__()
        self.loss_kwargs = loss_kwargs

    def forward(self, logits, labels, **kwargs):
        return preference_loss(logits, labels, **{**self.loss_kwargs, **kwargs})


class LinearPreferenceLoss(torch.nn.Module):
    """`linear_preference_loss` on an `nn.Linear` LM head: forward(hidden, lm_head, labels)."""

    def __init__(self, **loss_kwargs):
        super().__init__()
        self.loss_kwargs = loss_kwargs

    def forward(self, hidden, lm_head: torch.nn.Linear, labels, **kwargs):
        return linear_preference_loss(hidden, lm_head.weight, labels, bias=lm_head.bias,
                                      **{**self.loss_kwargs, **kwargs})
