"""The per-pair loss of every loss type, written once: plain torch on [B]-sized data, for
both backends and both front ends; its gradient comes from autograd (no hand-derived
derivative anywhere). The list of types, their families and sources is
`mixpo.loss_spec.LOSS_TYPES`; each type's `kernel_code` names its formula here.

Inputs are fp32 [2B] per-sequence values (chosen rows first) and [B] per-pair ones:
`logps` the preference log-probs (LD-DPO-weighted sums under ld_alpha), `nll_logps` the plain
sums of the NLL terms, `counts` the completion tokens, `ref_logps` or None, `hard` [B] bool or
None (MixDPO routing), `gamma` [B] target margins, `weights` [B] (WPO, detached) or None, and
`config` a `mixpo.loss_config.LossConfig`.

Margin types read z = beta * h - gamma - rdpo_alpha * (n_w - n_l), h = s(u_w) / n_w' -
s(u_l) / n_l' - dpop_lambda * max(0, -u_w / n_w') (n' = n when the type normalises length,
else 1; s = the f-divergence score); ratio types r = beta * u / n'; ORPO the log-odds of
logp / n'. Hard pairs take their token-mean NLL -nll_logp_w / n_w instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mixpo.loss_spec import MARGIN, RATIOS


def _f_divergence(u: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """TRL's score s(u) of a log-ratio (reverse_kl: s(u) = u)."""
    if kind == "forward_kl":
        return 1 - torch.exp(-u)
    if kind == "js_divergence":
        return math.log(2.0) + F.logsigmoid(u)
    if kind == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
        # TRL's clamp of the exponent at 80 (its gradient is 0 past it).
        return (torch.exp(((alpha - 1.0) * u).clamp(max=80.0)) - 1) / (alpha - 1.0)
    return u


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable on both sides of -ln 2 (TRL's ORPO). Each branch
    sees only inputs of its side, so the other's derivative is never inf * 0."""
    near = x > -math.log(2.0)
    return torch.where(near, torch.log(-torch.expm1(torch.where(near, x, -1.0))),
                       torch.log1p(-torch.exp(torch.where(near, -1.0, x))))


def _cdpo(z, eps):
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _exo(z, eps):
    p = torch.sigmoid(z)
    return p * (F.logsigmoid(z) - math.log(1 - eps)) + (1 - p) * (F.logsigmoid(-z)
                                                                  - math.log(eps))


def _discopop(z, tau):
    mix = torch.sigmoid(z / tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


# Margin family: loss(z, config) at z = beta * h - gamma.
MARGIN_FORMULAS = {
    0: lambda z, c: _cdpo(z, c.label_smoothing),          # sigmoid, sigmoid_norm, simpo, cpo
    1: lambda z, c: (-(1 - c.label_smoothing) * F.logsigmoid(z)             # robust
                     + c.label_smoothing * F.logsigmoid(-z)) / (1 - 2 * c.label_smoothing),
    2: lambda z, c: torch.relu(1 - z),                                       # hinge
    3: lambda z, c: ((z - 0.5) / c.beta) ** 2,                               # ipo
    4: lambda z, c: _exo(z, c.label_smoothing),                              # exo_pair
    5: lambda z, c: _discopop(z, c.discopop_tau),                            # discopop
}
# Ratio family: loss(r_w, r_l, beta) at r = beta * u / n'.
RATIO_FORMULAS = {
    6: lambda rc, rr, b: -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc)        # nca_pair
    - 0.5 * F.logsigmoid(-rr),
    7: lambda rc, rr, b: -F.logsigmoid(rc) - F.logsigmoid(-rr),              # bco_pair
    8: lambda rc, rr, b: (rc / b - 0.5 / b) ** 2 + (rr / b + 0.5 / b) ** 2,  # sppo_hard
    9: lambda rc, rr, b: 1 - torch.sigmoid(rc) + torch.sigmoid(rr),          # apo_zero
    10: lambda rc, rr, b: torch.sigmoid(rc) + 1 - torch.sigmoid(rc - rr),    # apo_down
}


def _odds_loss(avg_c, avg_r, beta):
    """ORPO: -beta log s(log odds(avg_w) - log odds(avg_l))."""
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    return -beta * F.logsigmoid(log_odds)


def _type_loss(spec, u_c, u_r, n_c, n_r, gamma, config):
    """The per-pair loss [B] of one loss type at log-ratios u_c, u_r."""
    normalized = config.normalized(spec)
    inv_c = 1 / n_c if normalized else torch.ones_like(n_c)
    inv_r = 1 / n_r if normalized else torch.ones_like(n_r)
    beta = config.beta
    if spec.family == MARGIN:
        kind, alpha = config.f_divergence_type, config.f_alpha_divergence_coef
        h = _f_divergence(u_c, kind, alpha) * inv_c - _f_divergence(u_r, kind, alpha) * inv_r \
            - config.dpop_lambda * torch.relu(-u_c * inv_c)
        z = beta * h - gamma - config.rdpo_alpha * (n_c - n_r)
        return MARGIN_FORMULAS[spec.kernel_code](z, config)
    if spec.family == RATIOS:
        return RATIO_FORMULAS[spec.kernel_code](beta * u_c * inv_c, beta * u_r * inv_r, beta)
    return _odds_loss(u_c * inv_c, u_r * inv_r, beta)


def pair_terms(logps, nll_logps, counts, ref_logps, hard, gamma, weights, config):
    """The per-pair part [B]: the types of `config.kernel_types`, weighted (WPO), routed
    (hard pairs: their chosen response's token-mean NLL), plus the per-pair NLL term when
    nll_normalization="pair"."""
    num_pairs = logps.shape[0] // 2
    ratios = logps if ref_logps is None else logps - ref_logps
    u_c, u_r = ratios[:num_pairs], ratios[num_pairs:]
    n_c, n_r = counts[:num_pairs], counts[num_pairs:]
    if hard is not None:
        # Hard pairs never reach the preference formulas: their inputs there are a constant
        # 0 (no gradient, and no inf from an extreme log-ratio times the routing's 0).
        u_c, u_r = torch.where(hard, 0.0, u_c), torch.where(hard, 0.0, u_r)
    loss = torch.zeros_like(u_c)
    for spec, type_weight in config.kernel_types:
        term = _type_loss(spec, u_c, u_r, n_c, n_r, gamma, config)
        loss = loss + (type_weight if weights is None else type_weight * weights) * term
    nll_pair = -nll_logps[:num_pairs] / n_c
    if hard is not None:
        loss = torch.where(hard, nll_pair, loss)
    if config.nll_normalization == "pair" and config.nll_weight:
        loss = loss + config.nll_weight * nll_pair
    return loss


def batch_nll(nll_logps, counts, config, chosen_tokens=None):
    """The batch-mean NLL of the chosen responses (nll_normalization="batch", TRL and Liger):
    -nll_weight * sum_i logp_w,i / sum_i n_w,i, a 0-d tensor, or None. `chosen_tokens`: the
    denominator when these are some of the batch's pairs (the one pass's groups)."""
    if config.nll_normalization != "batch" or not config.nll_weight:
        return None
    num_pairs = nll_logps.shape[0] // 2
    if chosen_tokens is None:
        chosen_tokens = counts[:num_pairs].sum()
    return -config.nll_weight * nll_logps[:num_pairs].sum() / chosen_tokens


def sorted_terms(logps, ref_logps, config):
    """AOT's losses [B] (aot, aot_unpaired): cDPO sigmoid of sorted margins, sorted across
    the batch (so each belongs to a sorted position, not to a pair), or None."""
    if not config.sorted_types:
        return None
    num_pairs = logps.shape[0] // 2
    ratios = logps if ref_logps is None else logps - ref_logps
    loss = logps.new_zeros(num_pairs)
    for spec, type_weight in config.sorted_types:
        if spec.name == "aot":    # sorted policy margins vs sorted reference margins
            first = logps[:num_pairs] - logps[num_pairs:]
            second = logps.new_zeros(num_pairs) if ref_logps is None else \
                ref_logps[:num_pairs] - ref_logps[num_pairs:]
        else:                     # aot_unpaired: sorted chosen vs sorted rejected log-ratios
            first, second = ratios[:num_pairs], ratios[num_pairs:]
        z = config.beta * (torch.sort(first).values - torch.sort(second).values)
        loss = loss + type_weight * _cdpo(z, config.label_smoothing)
    return loss


def per_pair_loss(logps, nll_logps, counts, ref_logps, hard, gamma, weights, config):
    """Each pair's loss [B] (differentiable): `pair_terms`, plus every pair's share of the
    batch NLL term and AOT's sorted losses. The loss is its mean."""
    loss = pair_terms(logps, nll_logps, counts, ref_logps, hard, gamma, weights, config)
    for term in (batch_nll(nll_logps, counts, config),
                 sorted_terms(logps, ref_logps, config)):
        if term is not None:
            loss = loss + term
    return loss


def group_objective(logps, nll_logps, counts, ref_logps, hard, gamma, weights, config,
                    num_pairs: int, chosen_tokens):
    """The share of the mean loss that some of the batch's pairs carry (the one pass's
    groups; no sorted types): their `pair_terms` summed over the batch's `num_pairs`, plus
    their part of the batch NLL term (`chosen_tokens`: the whole batch's). Summed over groups
    that cover the batch it is the mean loss, so its gradient is each group's exact share."""
    objective = pair_terms(logps, nll_logps, counts, ref_logps, hard, gamma, weights,
                           config).sum() / num_pairs
    nll = batch_nll(nll_logps, counts, config, chosen_tokens)
    return objective if nll is None else objective + nll
