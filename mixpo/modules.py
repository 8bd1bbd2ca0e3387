"""nn.Module wrappers over the loss API (Liger-style layering: kernels -> functional ->
modules). A module holds one `LossConfig`, built and validated by its constructor from the
same keywords the functional API takes (`mixpo.LossConfig`'s options); `LinearPreferenceLoss`
takes the LM head as an argument of forward so that, under FSDP, the head's weight is read
inside a module forward (where FSDP has unsharded it)."""
from __future__ import annotations

import torch

from mixpo.kernels.dispatch import check_backend
from mixpo.loss_config import LossConfig, loss_config_and_gamma, with_loss_options
from mixpo.losses import linear_loss, logits_loss


class _LossModule(torch.nn.Module):
    """The shared constructor: the loss options (a [B] gamma tensor is kept as the per-pair
    margins of every call that passes none), the backend."""

    def __init__(self, loss_type="sigmoid", *, backend: str = "auto", **options):
        super().__init__()
        self.config, self.gamma = loss_config_and_gamma({"loss_type": loss_type, **options})
        self.backend = check_backend(backend)

    @classmethod
    def from_config(cls, config: LossConfig, backend: str = "auto", **module_options):
        """A module holding an already built LossConfig."""
        module = cls(backend=backend, **module_options)
        module.config = config
        return module

    def _gamma(self, gamma):
        return self.gamma if gamma is None else gamma

    def extra_repr(self) -> str:
        return repr(self.config)


@with_loss_options
class PreferenceLoss(_LossModule):
    """`mixpo.preference_loss` as a module: `PreferenceLoss(beta=0.1)(logits, labels, ...)`.

    Constructor: the loss options (below), backend and inplace_backward; forward takes the
    per-batch tensors: logits [2B, T, V], labels [2B, T], ref_logps [2B], hard [B], gamma [B]
    (replaces the configured gamma), margin (a `mixpo.AdaptiveMargin`).
    {loss keywords}
    """

    def __init__(self, loss_type="sigmoid", *, backend: str = "auto",
                 inplace_backward: bool = False, **options):
        super().__init__(loss_type, backend=backend, **options)
        self.inplace_backward = inplace_backward

    def forward(self, logits, labels, ref_logps=None, hard=None, gamma=None, margin=None):
        return logits_loss(logits, labels, self.config, ref_logps=ref_logps, hard=hard,
                           gamma=self._gamma(gamma), margin=margin, backend=self.backend,
                           inplace_backward=self.inplace_backward)


@with_loss_options
class LinearPreferenceLoss(_LossModule):
    """`mixpo.linear_preference_loss` on an `nn.Linear` LM head (logit-free):
    `LinearPreferenceLoss(loss_type="simpo", beta=2.0)(hidden, lm_head, labels, ...)`.

    Same constructor as `PreferenceLoss` (no in-place option: there are no logits);
    forward(hidden [2B, T, H], lm_head, labels [2B, T], ref_logps, hard, gamma, margin).
    {loss keywords}
    """

    def forward(self, hidden, lm_head: torch.nn.Linear, labels, ref_logps=None, hard=None,
                gamma=None, margin=None):
        return linear_loss(hidden, lm_head.weight, labels, self.config, bias=lm_head.bias,
                           ref_logps=ref_logps, hard=hard, gamma=self._gamma(gamma),
                           margin=margin, backend=self.backend)
