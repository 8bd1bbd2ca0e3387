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

    Constructor arguments are the loss hyper-parameters (`mixpo.LossConfig`, the keywords of
    `mixpo.preference_loss`) plus backend and inplace_backward; forward takes the per-batch
    tensors: logits [2B, T, V], labels [2B, T], ref_logps [2B], hard [B], gamma [B] (replaces
    the fixed gamma), margin (a `mixpo.AdaptiveMargin`).
    """

    def __init__(self, loss_type="sigmoid", beta: float = 0.1, gamma=None,
                 label_smoothing: float = 0.0, average_log_prob=None, sft_weight: float = 0.0,
                 loss_weights=None, nll_normalization: str = "batch", cpo_alpha: float = 1.0,
                 discopop_tau: float = 0.05, use_weighting: bool = False,
                 f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                 ld_alpha=None, rdpo_alpha: float = 0.0, dpop_lambda: float = 0.0,
                 logit_scale: float = 1.0, softcap=None, token_metrics: bool = False,
                 ignore_index: int = -100, backend: str = "auto",
                 inplace_backward: bool = False):
        super().__init__()
        self.config = LossConfig(
            loss_type=loss_type, loss_weights=loss_weights, beta=beta, gamma=gamma,
            label_smoothing=label_smoothing, average_log_prob=average_log_prob,
            sft_weight=sft_weight, nll_normalization=nll_normalization, cpo_alpha=cpo_alpha,
            discopop_tau=discopop_tau, use_weighting=use_weighting,
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef, ld_alpha=ld_alpha,
            rdpo_alpha=rdpo_alpha, dpop_lambda=dpop_lambda, logit_scale=logit_scale,
            softcap=softcap, token_metrics=token_metrics, ignore_index=ignore_index)
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

    def __init__(self, loss_type="sigmoid", beta: float = 0.1, gamma=None,
                 label_smoothing: float = 0.0, average_log_prob=None, sft_weight: float = 0.0,
                 loss_weights=None, nll_normalization: str = "batch", cpo_alpha: float = 1.0,
                 discopop_tau: float = 0.05, use_weighting: bool = False,
                 f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                 ld_alpha=None, rdpo_alpha: float = 0.0, dpop_lambda: float = 0.0,
                 logit_scale: float = 1.0, softcap=None, token_metrics: bool = False,
                 ignore_index: int = -100, backend: str = "auto"):
        super().__init__()
        self.config = LossConfig(
            loss_type=loss_type, loss_weights=loss_weights, beta=beta, gamma=gamma,
            label_smoothing=label_smoothing, average_log_prob=average_log_prob,
            sft_weight=sft_weight, nll_normalization=nll_normalization, cpo_alpha=cpo_alpha,
            discopop_tau=discopop_tau, use_weighting=use_weighting,
            f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef, ld_alpha=ld_alpha,
            rdpo_alpha=rdpo_alpha, dpop_lambda=dpop_lambda, logit_scale=logit_scale,
            softcap=softcap, token_metrics=token_metrics, ignore_index=ignore_index)
        self.backend = check_backend(backend)

    @classmethod
    def from_config(cls, config: LossConfig, backend: str = "auto") -> "LinearPreferenceLoss":
        """A module holding an already built LossConfig."""
        module = cls(backend=backend)
        module.config = config
        return module

    def forward(self, hidden, lm_head: torch.nn.Linear, labels, ref_logps=None, hard=None,
                gamma=None, margin=None):
        return linear_loss(hidden, lm_head.weight, labels, self.config, bias=lm_head.bias,
                           ref_logps=ref_logps, hard=hard, gamma=gamma, margin=margin,
                           backend=self.backend)

    def extra_repr(self) -> str:
        return repr(self.config)
