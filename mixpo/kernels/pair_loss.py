"""Per-pair epilogue: loss type, target margin, MixDPO routing and SFT weight on [B] data.

Reads the summed sequence log-probs (chosen rows first), completion counts, reference
log-probs, routing flags and margins; writes each pair's loss, its derivatives with respect to
the chosen and rejected summed log-probs (handed to the token kernels' backward) and the
implicit rewards. Formulas: `mixpo.kernels.pair_loss_torch.pair_loss`, its twin.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixpo.kernels.configs import choose
from mixpo.loss_spec import LOSS_TYPES


@triton.jit
def _log_sigmoid(x):
    # log(sigmoid(x)) = min(x, 0) - log(1 + exp(-|x|)), stable for large |x|.
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _pair_loss_kernel(logps_ptr, counts_ptr, ref_ptr, hard_ptr, gamma_ptr, loss_ptr,
                      d_chosen_ptr, d_rejected_ptr, chosen_rewards_ptr, rejected_rewards_ptr,
                      num_pairs, beta, label_smoothing, sft_weight,
                      LOSS_KIND: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_B: tl.constexpr):
    pairs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = pairs < num_pairs
    # Sequence i's chosen response is row i, its rejected response row num_pairs + i.
    chosen_logp = tl.load(logps_ptr + pairs, mask=mask, other=0.0)
    rejected_logp = tl.load(logps_ptr + num_pairs + pairs, mask=mask, other=0.0)
    chosen_count = tl.load(counts_ptr + pairs, mask=mask, other=1.0)
    rejected_count = tl.load(counts_ptr + num_pairs + pairs, mask=mask, other=1.0)
    chosen_ref = tl.load(ref_ptr + pairs, mask=mask, other=0.0)
    rejected_ref = tl.load(ref_ptr + num_pairs + pairs, mask=mask, other=0.0)
    hard = tl.load(hard_ptr + pairs, mask=mask, other=0) != 0
    gamma = tl.load(gamma_ptr + pairs, mask=mask, other=0.0)

    if NORMALIZE:  # per-token log-ratios (ipo, simpo, average_log_prob)
        chosen_scale = beta / chosen_count
        rejected_scale = beta / rejected_count
    else:
        chosen_scale = tl.zeros_like(chosen_logp) + beta
        rejected_scale = tl.zeros_like(rejected_logp) + beta
    chosen_reward = chosen_scale * (chosen_logp - chosen_ref)
    rejected_reward = rejected_scale * (rejected_logp - rejected_ref)
    z = chosen_reward - rejected_reward - gamma  # = beta * h - gamma

    eps = label_smoothing
    if LOSS_KIND == 0:    # sigmoid / simpo, cDPO label smoothing
        loss = -(1.0 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z)
        dloss_dz = tl.sigmoid(z) - (1.0 - eps)
    elif LOSS_KIND == 1:  # robust (rDPO)
        loss = (-(1.0 - eps) * _log_sigmoid(z) + eps * _log_sigmoid(-z)) / (1.0 - 2.0 * eps)
        dloss_dz = tl.sigmoid(z) - (1.0 - eps) / (1.0 - 2.0 * eps)
    elif LOSS_KIND == 2:  # hinge
        loss = tl.maximum(1.0 - z, 0.0)
        dloss_dz = tl.where(z < 1.0, -1.0, 0.0)
    else:                 # ipo: (h - gamma / beta - 1 / (2 beta))^2
        loss = ((z - 0.5) / beta) * ((z - 0.5) / beta)
        dloss_dz = 2.0 * (z - 0.5) / (beta * beta)
    d_chosen = dloss_dz * chosen_scale
    d_rejected = -dloss_dz * rejected_scale

    # MixDPO routing: a hard pair learns only its chosen response (token-mean NLL).
    nll = -chosen_logp / chosen_count
    loss = tl.where(hard, nll, loss) + sft_weight * nll
    d_chosen = tl.where(hard, -1.0 / chosen_count, d_chosen) - sft_weight / chosen_count
    d_rejected = tl.where(hard, 0.0, d_rejected)

    tl.store(loss_ptr + pairs, loss, mask=mask)
    tl.store(d_chosen_ptr + pairs, d_chosen, mask=mask)
    tl.store(d_rejected_ptr + pairs, d_rejected, mask=mask)
    tl.store(chosen_rewards_ptr + pairs, chosen_reward, mask=mask)
    tl.store(rejected_rewards_ptr + pairs, rejected_reward, mask=mask)


def pair_loss(logps, counts, ref_logps, hard, gamma, config):
    """Same contract as `mixpo.kernels.pair_loss_torch.pair_loss` (all inputs [2B] or [B], fp32)."""
    num_pairs = logps.shape[0] // 2
    logps, counts = logps.float().contiguous(), counts.float().contiguous()
    ref_logps = torch.zeros_like(logps) if ref_logps is None else ref_logps.float().contiguous()
    hard = torch.zeros(num_pairs, dtype=torch.int8, device=logps.device) if hard is None \
        else hard.to(torch.int8).contiguous()
    gamma = gamma.float().contiguous()
    outputs = [torch.empty(num_pairs, dtype=torch.float32, device=logps.device)
               for _ in range(5)]
    launch = choose("pair_loss", num_pairs=num_pairs)
    grid = (triton.cdiv(num_pairs, launch.block("BLOCK_B")),)
    _pair_loss_kernel[grid](logps, counts, ref_logps, hard, gamma, *outputs, num_pairs,
                            config.beta, config.label_smoothing, config.sft_weight,
                            LOSS_KIND=LOSS_TYPES[config.loss_type].kernel_code,
                            NORMALIZE=config.normalized,
                            **launch.launch_kwargs())
    names = ("per_pair_loss", "d_chosen", "d_rejected", "chosen_rewards", "rejected_rewards")
    return dict(zip(names, outputs))
