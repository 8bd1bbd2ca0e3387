"""Plain-torch twin of `mixpo.kernels.pair_loss`: the per-pair epilogue on [B]-sized data, and
the readable statement of every loss formula (the list of types and their sources is
`mixpo.loss_spec.LOSS_TYPES`). Also `batch_terms`: the parts that couple the pairs of a batch
(the batch-mean NLL term, AOT's sorting), shared by both backends.

Every function returns per-pair losses and their "diagonal" derivatives: d_logps[i] is
d per_pair_loss[i mod B] / d logps[i]; the caller averages over pairs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mixpo.loss_spec import F_DIVERGENCES


def _f_divergence(u: torch.Tensor, kind: int, alpha: float):
    """TRL's score s(u) of a log-ratio and its derivative (reverse_kl: s(u) = u)."""
    if kind == F_DIVERGENCES["forward_kl"]:
        return 1 - torch.exp(-u), torch.exp(-u)
    if kind == F_DIVERGENCES["js_divergence"]:
        return math.log(2.0) + F.logsigmoid(u), torch.sigmoid(-u)
    if kind == F_DIVERGENCES["alpha_divergence"] and abs(alpha - 1.0) >= 1e-6:
        exponent = (alpha - 1.0) * u
        clipped = exponent > 80.0                      # TRL's clamp (fp32 / bf16 inputs)
        value = torch.exp(exponent.clamp(max=80.0))
        return (value - 1) / (alpha - 1.0), torch.where(clipped, 0.0, value)
    return u, torch.ones_like(u)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (TRL's ORPO)."""
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)),
                       torch.log(-torch.expm1(x)))


def _margin_loss(code: int, z: torch.Tensor, config):
    """(loss, d loss / d z) of a margin-family type at z = beta * h - gamma."""
    eps, beta = config.label_smoothing, config.beta
    if code == 0:    # sigmoid, sigmoid_norm, simpo, cpo (cDPO label smoothing)
        return (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z),
                torch.sigmoid(z) - (1 - eps))
    if code == 1:    # robust
        return ((-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps),
                torch.sigmoid(z) - (1 - eps) / (1 - 2 * eps))
    if code == 2:    # hinge
        return torch.relu(1 - z), torch.where(z < 1, -1.0, 0.0)
    if code == 3:    # ipo: ((z - 1/2) / beta)^2
        return ((z - 0.5) / beta) ** 2, 2 * (z - 0.5) / beta**2
    if code == 4:    # exo_pair: KL(sigmoid(z) || 1 - eps)
        p = torch.sigmoid(z)
        loss = p * (F.logsigmoid(z) - math.log(1 - eps)) \
            + (1 - p) * (F.logsigmoid(-z) - math.log(eps))
        return loss, p * (1 - p) * (z + math.log(eps) - math.log(1 - eps))
    if code == 5:    # discopop
        tau = config.discopop_tau
        mix = torch.sigmoid(z / tau)
        dmix = mix * (1 - mix) / tau
        logistic, exponential = -F.logsigmoid(z), torch.exp(-z)
        loss = logistic * (1 - mix) + exponential * mix
        return loss, (-torch.sigmoid(-z) * (1 - mix) - logistic * dmix
                      - exponential * mix + exponential * dmix)
    raise ValueError(f"no margin formula for kernel code {code}")


def _ratio_loss(code: int, r_c: torch.Tensor, r_r: torch.Tensor, beta: float):
    """(loss, d/d r_c, d/d r_r) of a ratio-family type, r = beta * u."""
    sig_c, sig_r = torch.sigmoid(r_c), torch.sigmoid(r_r)
    if code == 6:    # nca_pair
        return (-F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r),
                -(1 - sig_c) + 0.5 * sig_c, 0.5 * sig_r)
    if code == 7:    # bco_pair
        return -F.logsigmoid(r_c) - F.logsigmoid(-r_r), -(1 - sig_c), sig_r
    if code == 8:    # sppo_hard, on u = r / beta
        return ((r_c / beta - 0.5 / beta) ** 2 + (r_r / beta + 0.5 / beta) ** 2,
                2 * (r_c / beta - 0.5 / beta) / beta, 2 * (r_r / beta + 0.5 / beta) / beta)
    if code == 9:    # apo_zero
        return 1 - sig_c + sig_r, -sig_c * (1 - sig_c), sig_r * (1 - sig_r)
    if code == 10:   # apo_down
        sig_d = torch.sigmoid(r_c - r_r)
        slope = sig_d * (1 - sig_d)
        return sig_c + 1 - sig_d, sig_c * (1 - sig_c) - slope, slope
    raise ValueError(f"no ratio formula for kernel code {code}")


def pair_loss(logps, nll_logps, counts, ref_logps, hard, gamma, weights, config):
    """Per-pair loss and its derivatives w.r.t. the summed sequence log-probs.

    logps [2B] fp32, chosen first: the preference log-probs (LD-weighted with ld_alpha);
    nll_logps [2B]: plain summed log-probs (NLL terms); counts [2B]; ref_logps [2B] or None;
    hard [B] bool or None (MixDPO routing); gamma [B] fp32 margins; weights [B] fp32 (WPO) or
    None; config: a `mixpo.loss_config.LossConfig`.
    Returns per_pair_loss [B] (the types of `config.kernel_types`, weighted, routed, plus a
    per-pair NLL term when nll_normalization="pair"), d_logps [2B] and d_nll [2B] (its
    derivatives w.r.t. logps and nll_logps, per pair).

    Margin types read z = beta * h - gamma - rdpo_alpha * (n_w - n_l), h = s(u_w) / n_w' -
    s(u_l) / n_l' - dpop_lambda * max(0, -u_w / n_w') (n' = n when normalised, else 1;
    s = the f-divergence score); ratio types r = beta * u / n'; ORPO the log-odds of
    logp / n'. Hard pairs take their token-mean NLL -nll_logp_w / n_w instead.
    """
    num_pairs = logps.shape[0] // 2
    beta = config.beta
    ratios = logps if ref_logps is None else logps - ref_logps
    u_c, u_r = ratios[:num_pairs], ratios[num_pairs:]
    n_c, n_r = counts[:num_pairs], counts[num_pairs:]
    loss = torch.zeros_like(u_c)
    d_c, d_r = torch.zeros_like(u_c), torch.zeros_like(u_c)
    f_kind = F_DIVERGENCES[config.f_divergence_type]
    for spec, type_weight in config.kernel_types:
        normalized = config.normalized(spec)
        inv_c = 1 / n_c if normalized else torch.ones_like(n_c)
        inv_r = 1 / n_r if normalized else torch.ones_like(n_r)
        if spec.family == "margin":
            s_c, ds_c = _f_divergence(u_c, f_kind, config.f_alpha_divergence_coef)
            s_r, ds_r = _f_divergence(u_r, f_kind, config.f_alpha_divergence_coef)
            h = s_c * inv_c - s_r * inv_r - config.dpop_lambda * torch.relu(-u_c * inv_c)
            dh_c = ds_c * inv_c + config.dpop_lambda * torch.where(u_c < 0, inv_c, 0.0)
            dh_r = -ds_r * inv_r
            z = beta * h - gamma - config.rdpo_alpha * (n_c - n_r)
            term, dz = _margin_loss(spec.kernel_code, z, config)
            term_c, term_r = dz * beta * dh_c, dz * beta * dh_r
        elif spec.family == "ratios":
            term, dr_c, dr_r = _ratio_loss(spec.kernel_code, beta * u_c * inv_c,
                                           beta * u_r * inv_r, beta)
            term_c, term_r = dr_c * beta * inv_c, dr_r * beta * inv_r
        else:            # orpo: -beta log s(log odds), on logp / n' (reference-free)
            avg_c, avg_r = u_c * inv_c, u_r * inv_r
            log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
            term = -beta * F.logsigmoid(log_odds)
            slope = -beta * torch.sigmoid(-log_odds)
            term_c = slope * inv_c / (1 - torch.exp(avg_c))
            term_r = -slope * inv_r / (1 - torch.exp(avg_r))
        scale = type_weight if weights is None else type_weight * weights
        loss, d_c, d_r = loss + scale * term, d_c + scale * term_c, d_r + scale * term_r

    nll_pair = -nll_logps[:num_pairs] / n_c
    d_nll_c = torch.zeros_like(u_c)
    if hard is not None:
        # MixDPO routing: hard pairs learn only their chosen response (token-mean NLL).
        loss = torch.where(hard, nll_pair, loss)
        d_c, d_r = torch.where(hard, 0.0, d_c), torch.where(hard, 0.0, d_r)
        d_nll_c = torch.where(hard, -1 / n_c, 0.0)
    if config.nll_normalization == "pair" and config.nll_weight:
        loss = loss + config.nll_weight * nll_pair
        d_nll_c = d_nll_c - config.nll_weight / n_c
    return {"per_pair_loss": loss, "d_logps": torch.cat([d_c, d_r]),
            "d_nll": torch.cat([d_nll_c, torch.zeros_like(d_nll_c)])}


def batch_terms(logps, nll_logps, counts, ref_logps, config):
    """The terms that couple the pairs of a batch, for both backends: the batch-mean NLL of
    the chosen responses (nll_normalization="batch": -sum_i logp_w,i / sum_i n_w,i, every
    pair's share, as TRL and Liger) and AOT's sorted losses (aot, aot_unpaired).
    Returns (per_pair_loss [B], d_logps [2B], d_nll [2B]) to add to `pair_loss`'s."""
    num_pairs = logps.shape[0] // 2
    loss = logps.new_zeros(num_pairs)
    d_logps, d_nll = torch.zeros_like(logps), torch.zeros_like(logps)
    if config.nll_normalization == "batch" and config.nll_weight:
        chosen_tokens = counts[:num_pairs].sum()
        loss = loss - config.nll_weight * nll_logps[:num_pairs].sum() / chosen_tokens
        # Each pair's share of d(mean loss): B * d/d logp of the batch term.
        d_nll[:num_pairs] = -config.nll_weight * num_pairs / chosen_tokens
    eps, beta = config.label_smoothing, config.beta
    for spec, type_weight in config.sorted_types:
        ratios = logps if ref_logps is None else logps - ref_logps
        if spec.name == "aot":    # sorted policy margins vs sorted reference margins
            first = logps[:num_pairs] - logps[num_pairs:]
            second = logps.new_zeros(num_pairs) if ref_logps is None else \
                ref_logps[:num_pairs] - ref_logps[num_pairs:]
        else:                     # aot_unpaired: sorted chosen vs sorted rejected log-ratios
            first, second = ratios[:num_pairs], ratios[num_pairs:]
        first_sorted, first_order = torch.sort(first)
        second_sorted, second_order = torch.sort(second)
        z = beta * (first_sorted - second_sorted)
        loss = loss + type_weight * (-(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z))
        slope = type_weight * beta * (torch.sigmoid(z) - (1 - eps))   # d loss_k / d first_k
        d_first = torch.zeros_like(first).index_copy_(0, first_order, slope)
        if spec.name == "aot":    # first = logp_w - logp_l; second is constant
            d_logps[:num_pairs] += d_first
            d_logps[num_pairs:] -= d_first
        else:
            d_logps[:num_pairs] += d_first
            d_logps[num_pairs:] -= torch.zeros_like(second).index_copy_(0, second_order, slope)
    return loss, d_logps, d_nll
