"""Per-pair epilogue: every per-pair loss type, target margins, MixDPO routing and the NLL
terms on [B] data, in one launch.

Reads the summed sequence log-probs (chosen rows first), the plain summed log-probs of the NLL
terms, completion counts, reference log-probs, routing flags, margins and WPO weights; writes
each pair's loss and its derivatives with respect to both log-prob inputs (handed to the
token kernels' backward). A list of loss types (TRL's list form) is a loop over their kernel
codes inside the program; each code's formula is computed on the whole block and selected,
so one compiled kernel serves every type and mixture. Formulas: the twin,
`mixpo.kernels.pair_loss_torch` (which also holds the batch-coupled terms).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixpo.kernels.configs import choose
from mixpo.loss_spec import F_DIVERGENCES

MAX_TYPES = 4   # loss types in one list (TRL's MPO mixture has 3)


@triton.jit
def _log_sigmoid(x):
    # log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|)), stable for large |x|.
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _log1mexp(x):
    """log(1 - exp(x)) for x < 0. Near 0 (x >= -ln 2), 1 - exp(x) cancels: there it is
    -x * (1 + x/2 + x^2/6 + ... + x^9/10!), the series of -expm1(x), to fp32 precision."""
    x = tl.minimum(x, -1e-30)               # log-probs are < 0 (and masked lanes are 0)
    series = 1.0 + x / 10.0
    for k in range(9, 1, -1):
        series = 1.0 + x / k * series
    far = tl.log(tl.maximum(1.0 - tl.exp(x), 1e-30))   # selected only where x < -ln 2
    return tl.where(x < -0.6931471805599453, far, tl.log(-x * series))


@triton.jit
def _f_divergence(u, f_kind, f_alpha):
    """TRL's f-divergence score s(u) of a log-ratio and ds/du (0: reverse KL, s(u) = u)."""
    score = u
    slope = tl.zeros_like(u) + 1.0
    if f_kind == 1:      # forward KL
        score = 1.0 - tl.exp(-u)
        slope = tl.exp(-u)
    elif f_kind == 2:    # Jensen-Shannon
        score = 0.6931471805599453 + _log_sigmoid(u)
        slope = tl.sigmoid(-u)
    elif f_kind == 3:    # alpha divergence (TRL clamps the exponent at 80)
        exponent = (f_alpha - 1.0) * u
        value = tl.exp(tl.minimum(exponent, 80.0))
        score = (value - 1.0) / (f_alpha - 1.0)
        slope = tl.where(exponent > 80.0, 0.0, value)
    return score, slope


@triton.jit
def _pair_loss_kernel(logps_ptr, nll_ptr, counts_ptr, ref_ptr, hard_ptr, gamma_ptr,
                      weight_ptr, loss_ptr, d_logps_ptr, d_nll_ptr, num_pairs, num_types,
                      code0, code1, code2, code3, type_weight0, type_weight1, type_weight2,
                      type_weight3, normalized_mask, beta, label_smoothing, discopop_tau,
                      rdpo_alpha, dpop_lambda, f_kind, f_alpha, pair_nll_weight,
                      BLOCK_B: tl.constexpr):
    pairs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = pairs < num_pairs
    # Sequence i's chosen response is row i, its rejected response row num_pairs + i.
    u_c = tl.load(logps_ptr + pairs, mask=mask, other=0.0) \
        - tl.load(ref_ptr + pairs, mask=mask, other=0.0)
    u_r = tl.load(logps_ptr + num_pairs + pairs, mask=mask, other=0.0) \
        - tl.load(ref_ptr + num_pairs + pairs, mask=mask, other=0.0)
    n_c = tl.load(counts_ptr + pairs, mask=mask, other=1.0)
    n_r = tl.load(counts_ptr + num_pairs + pairs, mask=mask, other=1.0)
    hard = tl.load(hard_ptr + pairs, mask=mask, other=0) != 0
    gamma = tl.load(gamma_ptr + pairs, mask=mask, other=0.0) + rdpo_alpha * (n_c - n_r)
    pair_weight = tl.load(weight_ptr + pairs, mask=mask, other=1.0)
    eps = label_smoothing

    loss = tl.zeros_like(u_c)
    d_c = tl.zeros_like(u_c)
    d_r = tl.zeros_like(u_c)
    for index in range(num_types):
        # The index-th loss type of the list: its kernel code, weight, normalisation bit.
        code = tl.where(index == 0, code0,
                        tl.where(index == 1, code1, tl.where(index == 2, code2, code3)))
        type_weight = tl.where(index == 0, type_weight0, tl.where(
            index == 1, type_weight1, tl.where(index == 2, type_weight2, type_weight3)))
        scale = type_weight * pair_weight
        normalized = ((normalized_mask >> index) & 1) != 0
        inv_c = tl.where(normalized, 1.0 / n_c, 1.0)
        inv_r = tl.where(normalized, 1.0 / n_r, 1.0)

        # Margin family (codes 0-5): z = beta * h - gamma.
        s_c, ds_c = _f_divergence(u_c, f_kind, f_alpha)
        s_r, ds_r = _f_divergence(u_r, f_kind, f_alpha)
        h = s_c * inv_c - s_r * inv_r - dpop_lambda * tl.maximum(-u_c * inv_c, 0.0)
        dh_c = ds_c * inv_c + dpop_lambda * tl.where(u_c < 0.0, inv_c, 0.0)
        dh_r = -ds_r * inv_r
        z = beta * h - gamma
        sig_z = tl.sigmoid(z)
        ls_pos = _log_sigmoid(z)
        ls_neg = _log_sigmoid(-z)
        if code == 0:      # sigmoid, sigmoid_norm, simpo, cpo (cDPO label smoothing)
            term = -(1.0 - eps) * ls_pos - eps * ls_neg
            dz = sig_z - (1.0 - eps)
        elif code == 1:    # robust
            term = (-(1.0 - eps) * ls_pos + eps * ls_neg) / (1.0 - 2.0 * eps)
            dz = sig_z - (1.0 - eps) / (1.0 - 2.0 * eps)
        elif code == 2:    # hinge
            term = tl.maximum(1.0 - z, 0.0)
            dz = tl.where(z < 1.0, -1.0, 0.0)
        elif code == 3:    # ipo
            term = ((z - 0.5) / beta) * ((z - 0.5) / beta)
            dz = 2.0 * (z - 0.5) / (beta * beta)
        elif code == 4:    # exo_pair
            term = sig_z * (ls_pos - tl.log(1.0 - eps)) + (1.0 - sig_z) * (ls_neg - tl.log(eps))
            dz = sig_z * (1.0 - sig_z) * (z + tl.log(eps) - tl.log(1.0 - eps))
        elif code == 5:    # discopop
            mix = tl.sigmoid(z / discopop_tau)
            dmix = mix * (1.0 - mix) / discopop_tau
            exponential = tl.exp(-z)
            term = -ls_pos * (1.0 - mix) + exponential * mix
            dz = -(1.0 - sig_z) * (1.0 - mix) + ls_pos * dmix - exponential * mix \
                + exponential * dmix
        else:              # another family: replaced below
            term = tl.zeros_like(z)
            dz = tl.zeros_like(z)
        term_c = dz * beta * dh_c
        term_r = dz * beta * dh_r

        if code >= 6:      # ratio family (6-10): r = beta * u / n'
            r_c = beta * u_c * inv_c
            r_r = beta * u_r * inv_r
            sig_c = tl.sigmoid(r_c)
            sig_r = tl.sigmoid(r_r)
            if code == 6:      # nca_pair
                term = -_log_sigmoid(r_c) - 0.5 * _log_sigmoid(-r_c) - 0.5 * _log_sigmoid(-r_r)
                dr_c = -(1.0 - sig_c) + 0.5 * sig_c
                dr_r = 0.5 * sig_r
            elif code == 7:    # bco_pair
                term = -_log_sigmoid(r_c) - _log_sigmoid(-r_r)
                dr_c = -(1.0 - sig_c)
                dr_r = sig_r
            elif code == 8:    # sppo_hard
                a_c = u_c * inv_c - 0.5 / beta
                a_r = u_r * inv_r + 0.5 / beta
                term = a_c * a_c + a_r * a_r
                dr_c = 2.0 * a_c / beta
                dr_r = 2.0 * a_r / beta
            elif code == 9:    # apo_zero
                term = 1.0 - sig_c + sig_r
                dr_c = -sig_c * (1.0 - sig_c)
                dr_r = sig_r * (1.0 - sig_r)
            elif code == 10:   # apo_down
                sig_d = tl.sigmoid(r_c - r_r)
                term = sig_c + 1.0 - sig_d
                dr_c = sig_c * (1.0 - sig_c) - sig_d * (1.0 - sig_d)
                dr_r = sig_d * (1.0 - sig_d)
            else:              # orpo (code 11): -beta log s(log odds of logp / n')
                avg_c = u_c * inv_c
                avg_r = u_r * inv_r
                log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
                term = -beta * _log_sigmoid(log_odds)
                slope = -beta * tl.sigmoid(-log_odds)
                dr_c = slope / (1.0 - tl.exp(avg_c)) / beta
                dr_r = -slope / (1.0 - tl.exp(avg_r)) / beta
            term_c = dr_c * beta * inv_c
            term_r = dr_r * beta * inv_r
        loss += scale * term
        d_c += scale * term_c
        d_r += scale * term_r

    # MixDPO routing: a hard pair learns only its chosen response (token-mean NLL).
    nll = -tl.load(nll_ptr + pairs, mask=mask, other=0.0) / n_c
    loss = tl.where(hard, nll, loss) + pair_nll_weight * nll
    d_nll = tl.where(hard, -1.0 / n_c, 0.0) - pair_nll_weight / n_c
    tl.store(loss_ptr + pairs, loss, mask=mask)
    tl.store(d_logps_ptr + pairs, tl.where(hard, 0.0, d_c), mask=mask)
    tl.store(d_logps_ptr + num_pairs + pairs, tl.where(hard, 0.0, d_r), mask=mask)
    tl.store(d_nll_ptr + pairs, d_nll, mask=mask)
    tl.store(d_nll_ptr + num_pairs + pairs, tl.zeros_like(d_nll), mask=mask)


def pair_loss(logps, nll_logps, counts, ref_logps, hard, gamma, weights, config):
    """Same contract as `mixpo.kernels.pair_loss_torch.pair_loss` (inputs [2B] / [B] fp32)."""
    num_pairs = logps.shape[0] // 2
    device = logps.device
    logps, counts = logps.float().contiguous(), counts.float().contiguous()
    nll_logps = nll_logps.float().contiguous()
    ref_logps = torch.zeros_like(logps) if ref_logps is None else ref_logps.float().contiguous()
    hard = torch.zeros(num_pairs, dtype=torch.int8, device=device) if hard is None \
        else hard.to(torch.int8).contiguous()
    weights = torch.ones(num_pairs, dtype=torch.float32, device=device) if weights is None \
        else weights.float().contiguous()
    kinds = config.kernel_types
    if len(kinds) > MAX_TYPES:
        raise ValueError(f"loss_type: at most {MAX_TYPES} kernel loss types in one list, "
                         f"got {len(kinds)}")
    # Per-type scalars of the list, padded to MAX_TYPES (host values: no device copy).
    codes = [spec.kernel_code for spec, _ in kinds] + [0] * (MAX_TYPES - len(kinds))
    type_weights = [weight for _, weight in kinds] + [0.0] * (MAX_TYPES - len(kinds))
    normalized_mask = sum(int(config.normalized(spec)) << index
                          for index, (spec, _) in enumerate(kinds))
    loss = torch.empty(num_pairs, dtype=torch.float32, device=device)
    d_logps, d_nll = torch.empty_like(logps), torch.empty_like(logps)
    launch = choose("pair_loss", num_pairs=num_pairs)
    grid = (triton.cdiv(num_pairs, launch.block("BLOCK_B")),)
    pair_nll_weight = config.nll_weight if config.nll_normalization == "pair" else 0.0
    _pair_loss_kernel[grid](
        logps, nll_logps, counts, ref_logps, hard, gamma.float().contiguous(), weights, loss,
        d_logps, d_nll, num_pairs, len(kinds), *codes, *type_weights, normalized_mask,
        config.beta, config.label_smoothing, config.discopop_tau, config.rdpo_alpha,
        config.dpop_lambda, F_DIVERGENCES[config.f_divergence_type],
        config.f_alpha_divergence_coef, pair_nll_weight, **launch.launch_kwargs())
    return {"per_pair_loss": loss, "d_logps": d_logps, "d_nll": d_nll}
