"""`LossConfig`: the hyper-parameters of one preference loss, validated once.

Both front ends (`preference_loss` over logits, `linear_preference_loss` logit-free) and the
`nn.Module` wrappers build one frozen `LossConfig` and hand it down; the kernels and their
twins read its fields. Per-call tensors (reference log-probs, routing flags, per-pair
margins) are not part of it. Names follow TRL's DPOConfig where TRL has the option.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional, Sequence, Union

from mixpo.loss_spec import (F_DIVERGENCES, IGNORE_INDEX, LOSS_TYPES, MARGIN, NLL,
                             NLL_NORMALIZATIONS, ODDS, RATIOS, SORTED, loss_type_spec,
                             normalizes_length)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _option(default, help: str, **metadata):
    """A LossConfig field: its help text is the one the functional API's docstring, the
    modules, `mixpo train --help` and MixpoDPOConfig show (`metadata["help"]`)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass(frozen=True)
class LossConfig:
    """The hyper-parameters of one preference loss: the single definition of the loss
    options. The functional front ends and the modules take them as keywords
    (`loss_config_and_gamma`), mixpo's TrainConfig and the TRL integration's MixpoDPOConfig
    derive their loss fields from these (`user_options`), and every help text comes from
    each field's metadata. Names follow TRL's DPOConfig where TRL has the option."""
    loss_type: Union[str, tuple] = _option(
        "sigmoid", "a type of mixpo.loss_spec.LOSS_TYPES -- sigmoid (DPO; label_smoothing = "
        "cDPO), robust (rDPO), hinge, ipo (per-token, TRL), exo_pair, discopop, sigmoid_norm, "
        "simpo, cpo, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, orpo, sft, aot, "
        "aot_unpaired -- or a list of them (TRL's list form, e.g. MPO's sigmoid, bco_pair, "
        "sft) combined with loss_weights; sft combines with any type")
    loss_weights: Optional[tuple] = _option(
        None, "one weight per loss_type entry (default 1 each)")
    beta: float = _option(0.1, "inverse temperature (> 0); ORPO's lambda")
    gamma: Optional[float] = _option(
        None, "target margin of the margin types, z = beta * h - gamma; None = the type's "
        "default (simpo 0.5, as TRL's CPOConfig and Liger; 0 otherwise). The functional API "
        "and the modules also take a [B] tensor (per-pair margins)")
    label_smoothing: float = _option(0.0, "cDPO / rDPO / EXO / AOT epsilon in [0, 0.5)")
    average_log_prob: Optional[bool] = _option(
        None, "None = each type's convention (per-token log-ratios for ipo, sigmoid_norm, "
        "simpo and orpo, summed otherwise); True / False force per-token / summed")
    sft_weight: float = _option(0.0, "adds sft_weight * NLL of the chosen responses (>= 0)")
    nll_normalization: str = _option(
        "batch", "the NLL terms (sft_weight, sft, CPO, ORPO): batch (TRL, Liger: mean over "
        "every chosen completion token of the batch) or pair (mean over pairs of each "
        "response's token mean); MixDPO's routed pairs always use their own token mean",
        choices=NLL_NORMALIZATIONS)
    cpo_alpha: float = _option(1.0, "weight of CPO's NLL term (TRL's name, Liger's alpha)")
    discopop_tau: float = _option(0.05, "DiscoPOP's temperature (TRL's default)")
    use_weighting: bool = _option(
        False, "WPO (Zhou et al. 2024): each pair's loss times the detached weight "
        "exp(mean_t[log p_t - log sum_v p_v^2]) of its chosen and its rejected response")
    f_divergence_type: str = _option(
        "reverse_kl", "TRL's f-divergence of the log-ratios (margin types only): "
        + " | ".join(F_DIVERGENCES), choices=F_DIVERGENCES)
    f_alpha_divergence_coef: float = _option(0.5, "alpha of alpha_divergence")
    ld_alpha: Optional[float] = _option(
        None, "LD-DPO (Liu et al. 2024): completion tokens past the shorter response's "
        "length count ld_alpha times (also in the reference log-probs); None = off")
    rdpo_alpha: float = _option(0.0, "R-DPO (Park et al. 2024): z -= rdpo_alpha * (n_w - n_l)")
    dpop_lambda: float = _option(0.0, "DPOP (Pal et al. 2024): h -= dpop_lambda * max(0, -u_w)")
    logit_scale: float = _option(
        1.0, "the model's logits are softcap * tanh(logit_scale * z / softcap), plain "
        "logit_scale * z without softcap (z = hidden @ weight.T + bias); temperature T is "
        "logit_scale = 1 / T. Trainers read it from the model config", model=True)
    softcap: Optional[float] = _option(
        None, "final logit soft-capping (Gemma-2: 30); trainers read it from the model "
        "config", model=True)
    token_metrics: bool = _option(
        False, "also return TRL's logits/chosen, logits/rejected, entropy and "
        "mean_token_accuracy from the same pass")
    ignore_index: int = _option(
        IGNORE_INDEX, "the label of prompt and padding positions (mixpo's data layer and the "
        "TRL adapter label them mixpo.loss_spec.IGNORE_INDEX, -100)", model=True)

    @classmethod
    def from_options(cls, options, **overrides) -> "LossConfig":
        """The loss an options object describes (mixpo's TrainConfig, the TRL integration's
        MixpoDPOConfig: both declare `user_options()`): every user option read from
        `options` (a missing one is an error, never a silent default), list-valued
        loss_type / loss_weights as tuples, and no fixed gamma under
        `options.adaptive_margin` (gamma-PO's solver supplies the margins). `overrides` win
        (e.g. the model's logit_scale / softcap)."""
        values = {}
        for name in user_options():
            if name in overrides:
                continue
            if not hasattr(options, name):
                raise TypeError(f"{type(options).__name__} has no loss option {name!r}")
            values[name] = getattr(options, name)
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
        object.__setattr__(self, "loss_type", tuple(types))     # always a tuple of terms
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
        # sft (the chosen NLL) needs no reference and sits beside either kind.
        reference_free = {spec.reference_free for spec in specs if spec.family != NLL}
        _check(len(reference_free) <= 1, "loss_type mixes reference-free and reference-based "
               f"types: {list(types)}")
        defaults = {spec.default_gamma for spec in specs if spec.family == MARGIN}
        _check(self.gamma is not None or len(defaults) <= 1,
               f"loss_type {list(types)} combines margin types with different default margins: "
               "set gamma")
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
        return tuple(zip((LOSS_TYPES[name] for name in self.loss_type), self.loss_weights))

    @property
    def fixed_gamma(self) -> float:
        """The fixed margin: `gamma`, or the margin types' default (`LossType.default_gamma`:
        SimPO 0.5, else 0) when None."""
        if self.gamma is not None:
            return self.gamma
        return next((spec.default_gamma for spec, _ in self.types if spec.family == MARGIN),
                    0.0)

    @property
    def reference_free(self) -> bool:
        """No reference log-probs: every type but sft is reference-free (sft alone: its own
        flag)."""
        specs = [spec for spec, _ in self.types if spec.family != NLL] or \
            [spec for spec, _ in self.types]
        return specs[0].reference_free

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


# ----------------------------------------------------------------------------------------------
# The options as keywords and as fields of other configs
# ----------------------------------------------------------------------------------------------
LOSS_OPTIONS = tuple(item.name for item in fields(LossConfig))


def user_options() -> tuple:
    """The options a training config declares (not the model-derived logit_scale / softcap,
    nor ignore_index, which the data layer fixes)."""
    return tuple(item.name for item in fields(LossConfig) if not item.metadata.get("model"))


def option_fields(exclude=()) -> list:
    """[(name, type, dataclasses.field)] of the user options, for `make_dataclass`: how
    mixpo's TrainConfig and MixpoDPOConfig declare them, derived from LossConfig so that a
    new or renamed option needs no other edit. Lists where a config file writes lists
    (loss_type, loss_weights); defaults and help (and choices) as LossConfig's."""
    import typing

    hints = typing.get_type_hints(LossConfig)
    spelled = {"loss_type": list[str], "loss_weights": Optional[list[float]]}
    result = []
    for item in fields(LossConfig):
        if item.name not in user_options() or item.name in exclude:
            continue
        if item.name == "loss_type":          # a list default needs a factory
            made = field(default_factory=lambda value=item.default: [value],
                         metadata=item.metadata)
        else:
            made = field(default=item.default, metadata=item.metadata)
        result.append((item.name, spelled.get(item.name, hints[item.name]), made))
    return result


def option_help(name: str) -> str:
    return next(item.metadata["help"] for item in fields(LossConfig) if item.name == name)


def loss_config_and_gamma(options: dict) -> tuple:
    """(LossConfig, per-pair gamma tensor or None) of front-end keywords: an unknown name is
    refused by name; a tensor gamma is per call, a number goes into the config."""
    unknown = sorted(set(options) - set(LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"unknown loss option(s) {unknown}; the options are "
                        f"{', '.join(LOSS_OPTIONS)}")
    gamma = options.get("gamma")
    if gamma is not None and not isinstance(gamma, (int, float)) and hasattr(gamma, "shape"):
        return LossConfig(**{**options, "gamma": None}), gamma
    return LossConfig(**options), None


def loss_keywords_doc(indent: str = "        ") -> str:
    """The loss keywords' documentation, from the fields' help texts (for docstrings)."""
    import textwrap

    lines = []
    for item in fields(LossConfig):
        text = f"{item.name}: {item.metadata['help']}."
        lines += textwrap.wrap(text, 96 - len(indent), initial_indent=indent,
                               subsequent_indent=indent + "    ")
    return "\n".join(lines)


def with_loss_options(function):
    """Give `function(..., **options)` (or a class whose __init__ takes them) the loss options
    as keyword-only parameters in its signature (help(), IDEs) and their documentation in
    place of `{loss keywords}`."""
    import inspect

    target = function.__init__ if isinstance(function, type) else function
    signature = inspect.signature(target)
    parameters = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
    taken = {p.name for p in parameters}
    parameters += [inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY,
                                     default=item.default) for item in fields(LossConfig)
                   if item.name not in taken]
    target.__signature__ = signature.replace(parameters=parameters)
    if function.__doc__:
        function.__doc__ = function.__doc__.replace(
            "    {loss keywords}", "    Loss keywords (mixpo.LossConfig):\n" + loss_keywords_doc())
    return function
