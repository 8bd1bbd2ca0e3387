"""`LossConfig`: the hyper-parameters of one preference loss, validated once.

Both front ends (`preference_loss` over logits, `linear_preference_loss` logit-free) and the
`nn.Module` wrappers build one frozen `LossConfig` and hand it down; the kernels and their
twins read its fields. Per-call tensors (reference log-probs, routing flags, per-pair
margins) are not part of it. Names follow TRL's DPOConfig where TRL has the option.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Sequence, Union

from mixpo.loss_spec import (F_DIVERGENCES, LOSS_TYPES, MARGIN, NLL_NORMALIZATIONS, ODDS,
                             RATIOS, SORTED, loss_type_spec, normalizes_length)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class LossConfig:
    """loss_type: a name of `mixpo.loss_spec.LOSS_TYPES`, or a list of them (TRL's list
        form, e.g. MPO's ["sigmoid", "bco_pair", "sft"]) combined with `loss_weights`.
    loss_weights: one weight per type of a list (default 1 each).
    beta: inverse temperature (> 0); ORPO's lambda.
    gamma: fixed target margin of the margin-family types, z = beta * h - gamma; None = the
        type's default (SimPO 0.5, as TRL's CPOConfig and Liger; 0 otherwise). A [B] tensor
        or an adaptive margin (gamma-PO) can replace it per call.
    label_smoothing: cDPO / rDPO / EXO / AOT epsilon in [0, 0.5).
    average_log_prob: None = each type's own convention (per-token log-ratios for ipo,
        sigmoid_norm, simpo and orpo, summed otherwise); True / False force it.
    sft_weight: adds sft_weight * NLL of the chosen responses to the loss (>= 0).
    nll_normalization: "batch" (TRL, Liger: mean over every chosen completion token of the
        batch) or "pair" (the mean over pairs of each response's token mean) for the
        sft_weight / sft / CPO / ORPO NLL terms. MixDPO's routed hard pairs always use their
        own token mean (the authors' code).
    cpo_alpha: weight of CPO's NLL term (TRL's name, Liger's alpha).
    discopop_tau: DiscoPOP's temperature (TRL's default 0.05).
    use_weighting: WPO (Zhou et al. 2024): each pair's loss times the detached weight
        exp(mean_t[log p_t - log sum_v p_v^2]) of its chosen and its rejected response.
    f_divergence_type / f_alpha_divergence_coef: TRL's f-divergence of the log-ratios
        (reverse_kl, forward_kl, js_divergence, alpha_divergence); margin types only.
    ld_alpha: LD-DPO (Liu et al. 2024): completion tokens past the shorter response's length
        count ld_alpha times in the preference term (and in the reference log-probs).
    rdpo_alpha: R-DPO (Park et al. 2024): z -= rdpo_alpha * (n_w - n_l).
    dpop_lambda: DPOP (Pal et al. 2024): h -= dpop_lambda * max(0, -u_w).
    logit_scale / softcap: the model's logits are softcap * tanh(logit_scale * z / softcap)
        (plain logit_scale * z without softcap), z = hidden @ weight.T (+ bias);
        temperature T is logit_scale = 1 / T.
    token_metrics: also return TRL's per-token metrics from the same pass (mean logit,
        entropy, label-is-argmax accuracy).
    ignore_index: the label of prompt and padding positions.
    """
    loss_type: Union[str, tuple] = "sigmoid"
    loss_weights: Optional[tuple] = None
    beta: float = 0.1
    gamma: Optional[float] = None
    label_smoothing: float = 0.0
    average_log_prob: Optional[bool] = None
    sft_weight: float = 0.0
    nll_normalization: str = "batch"
    cpo_alpha: float = 1.0
    discopop_tau: float = 0.05
    use_weighting: bool = False
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    ld_alpha: Optional[float] = None
    rdpo_alpha: float = 0.0
    dpop_lambda: float = 0.0
    logit_scale: float = 1.0
    softcap: Optional[float] = None
    token_metrics: bool = False
    ignore_index: int = -100

    @classmethod
    def from_options(cls, options, **overrides) -> "LossConfig":
        """The loss an options object with these field names describes (mixpo's TrainConfig,
        the TRL integration's MixpoDPOConfig): each field read from `options` where it has
        it, list-valued loss_type / loss_weights as tuples, and no fixed gamma under
        `options.adaptive_margin` (gamma-PO's solver supplies the margins). `overrides` win
        (e.g. the model's logit_scale / softcap)."""
        values = {field.name: getattr(options, field.name) for field in fields(cls)
                  if hasattr(options, field.name)}
        for name in ("loss_type", "loss_weights"):
            if isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        if getattr(options, "adaptive_margin", False):
            values["gamma"] = None
        values.update(overrides)
        return cls(**values)

    def __post_init__(self):
        types = self.loss_type
        if isinstance(types, str):
            types = (types,)
        _check(isinstance(types, Sequence) and len(types) > 0
               and all(isinstance(name, str) for name in types),
               f"loss_type must be a string or a non-empty list of strings, got {types!r}")
        specs = [loss_type_spec(name) for name in types]
        _check(len(set(types)) == len(types), f"loss_type lists {list(types)} twice")
        weights = self.loss_weights
        if weights is None:
            weights = (1.0,) * len(types)
        _check(isinstance(weights, Sequence) and len(weights) == len(types)
               and all(_number(w) and w >= 0 for w in weights),
               f"loss_weights must be {len(types)} finite numbers >= 0 (one per loss_type), "
               f"got {self.loss_weights!r}")
        object.__setattr__(self, "loss_type", types[0] if len(types) == 1 else tuple(types))
        object.__setattr__(self, "loss_weights", tuple(float(w) for w in weights))

        for name in ("beta", "discopop_tau", "logit_scale"):
            _check(_number(getattr(self, name)) and getattr(self, name) > 0,
                   f"{name} must be a finite float > 0, got {getattr(self, name)!r}")
        for name in ("sft_weight", "cpo_alpha", "rdpo_alpha", "dpop_lambda"):
            _check(_number(getattr(self, name)) and getattr(self, name) >= 0,
                   f"{name} must be a finite float >= 0, got {getattr(self, name)!r}")
        _check(self.gamma is None or _number(self.gamma),
               f"gamma must be finite (a float), got {self.gamma!r}")
        _check(_number(self.label_smoothing) and 0 <= self.label_smoothing < 0.5,
               f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")
        for spec in specs:
            _check(not self.label_smoothing or spec.label_smoothing,
                   f"label_smoothing is not defined for loss_type={spec.name!r}")
            _check(spec.label_smoothing != "required" or self.label_smoothing > 0,
                   f"loss_type={spec.name!r} needs label_smoothing > 0 (its epsilon)")
        _check(self.average_log_prob in (None, True, False),
               f"average_log_prob must be None, True or False, got {self.average_log_prob!r}")
        _check(self.nll_normalization in NLL_NORMALIZATIONS,
               f"nll_normalization must be one of {', '.join(NLL_NORMALIZATIONS)}, "
               f"got {self.nll_normalization!r}")
        _check(self.f_divergence_type in F_DIVERGENCES,
               f"f_divergence_type must be one of {', '.join(F_DIVERGENCES)}, "
               f"got {self.f_divergence_type!r}")
        _check(_number(self.f_alpha_divergence_coef),
               f"f_alpha_divergence_coef must be finite, got {self.f_alpha_divergence_coef!r}")
        if self.f_divergence_type != "reverse_kl":
            _check(all(spec.family in (MARGIN,) or spec.name == "sft" for spec in specs),
                   f"f_divergence_type={self.f_divergence_type!r} applies to the margin loss "
                   f"types only, not {[s.name for s in specs if s.family != MARGIN]}")
        _check(self.ld_alpha is None or (_number(self.ld_alpha) and 0 <= self.ld_alpha <= 1),
               f"ld_alpha must be None or in [0, 1], got {self.ld_alpha!r}")
        _check(self.softcap is None or (_number(self.softcap) and self.softcap > 0),
               f"softcap must be None or a finite float > 0, got {self.softcap!r}")
        _check(not (self.use_weighting and any(spec.family == SORTED for spec in specs)),
               "use_weighting is not defined for aot / aot_unpaired (they sort across the "
               "batch)")
        reference_free = {spec.reference_free for spec in specs}
        _check(len(reference_free) == 1, "loss_type mixes reference-free and reference-based "
               f"types: {list(types)}")
        for name in ("use_weighting", "token_metrics"):
            _check(isinstance(getattr(self, name), bool),
                   f"{name} must be True or False, got {getattr(self, name)!r}")
        _check(not isinstance(self.ignore_index, bool) and isinstance(self.ignore_index, int),
               f"ignore_index must be an int, got {self.ignore_index!r}")
        # Plain floats from here on (ints and numpy scalars were accepted above).
        for item in fields(self):
            value = getattr(self, item.name)
            if item.type in ("float", "Optional[float]") and value is not None:
                object.__setattr__(self, item.name, float(value))

    # -- derived views ---------------------------------------------------------------------
    @property
    def types(self) -> tuple:
        """(LossType, weight) of every type of the loss."""
        names = (self.loss_type,) if isinstance(self.loss_type, str) else self.loss_type
        return tuple(zip((LOSS_TYPES[name] for name in names), self.loss_weights))

    @property
    def fixed_gamma(self) -> float:
        """The fixed margin: `gamma`, or the type's default (SimPO 0.5, else 0) when None."""
        if self.gamma is not None:
            return self.gamma
        return 0.5 if self.loss_type == "simpo" else 0.0

    @property
    def reference_free(self) -> bool:
        return self.types[0][0].reference_free

    @property
    def has_margin(self) -> bool:
        """Whether gamma (fixed, per pair or adaptive) enters any of the types."""
        return any(spec.family == MARGIN for spec, _ in self.types)

    def normalized(self, spec=None) -> bool:
        """Whether `spec` (default: the first type) uses per-token log-ratios."""
        return normalizes_length((spec or self.types[0][0]).name, self.average_log_prob)

    @property
    def reward_normalized(self) -> bool:
        """Whether the reported rewards are per token: TRL reports summed rewards for every
        DPOTrainer type (ipo and sigmoid_norm included); SimPO and ORPO per token; forcing
        average_log_prob=True makes them per token too."""
        if self.average_log_prob is not None:
            return self.average_log_prob
        return self.types[0][0].reward_normalized

    @property
    def nll_weight(self) -> float:
        """The total weight of the chosen-response NLL term: sft_weight, the weight of an
        "sft" entry, CPO's cpo_alpha, ORPO's 1."""
        weight = self.sft_weight
        for spec, spec_weight in self.types:
            if spec.name == "sft":
                weight += spec_weight
            elif spec.nll == "cpo_alpha":
                weight += spec_weight * self.cpo_alpha
            elif spec.nll == "one":
                weight += spec_weight
        return weight

    @property
    def kernel_types(self) -> tuple:
        """(LossType, weight) of the types the pair kernel computes (not sft, not aot)."""
        return tuple((spec, weight) for spec, weight in self.types
                     if spec.family in (MARGIN, RATIOS, ODDS))

    @property
    def sorted_types(self) -> tuple:
        return tuple((spec, weight) for spec, weight in self.types if spec.family == SORTED)

    @property
    def needs_stats(self) -> bool:
        """Whether stage 1 must return the per-token statistics."""
        return self.token_metrics or self.use_weighting

    @property
    def transformed(self) -> bool:
        return self.logit_scale != 1.0 or self.softcap is not None
