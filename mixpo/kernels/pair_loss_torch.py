"""Plain-torch twin of `mixpo.kernels.pair_loss`: the per-pair epilogue on [B]-sized data, and
the readable statement of every loss formula (see `mixpo.loss_spec` for the list of types).
"""
from __future__ import annotations

import torch

from mixpo.loss_spec import sequence_rewards


def pair_loss(logps, counts, ref_logps, hard, gamma, config):
    """Per-pair loss and its derivatives w.r.t. the summed sequence log-probs.

    logps, counts, ref_logps (or None): [2B] fp32, chosen first. hard [B] bool or None,
    gamma [B] fp32; config: a `mixpo.loss_config.LossConfig`. Returns a dict of [B] fp32
    tensors: per_pair_loss, d_chosen, d_rejected (d per_pair_loss / d summed logp),
    chosen_rewards, rejected_rewards.

    z = r_w - r_l - gamma with r = beta * (logp - ref) (per token when normalised), i.e.
    z = beta * h - gamma.  sigmoid/simpo: -(1-e) log s(z) - e log s(-z);
    robust: (-(1-e) log s(z) + e log s(-z)) / (1 - 2e); hinge: relu(1 - z);
    ipo: ((z - 1/2) / beta)^2 = (h - gamma/beta - 1/(2 beta))^2.
    Hard pairs take -logp_w / n_w (token-mean NLL of chosen); every pair adds
    sft_weight * that NLL.
    """
    num_pairs = logps.shape[0] // 2
    loss_type, beta = config.loss_type, config.beta
    rewards, scale = sequence_rewards(logps, counts, ref_logps, beta, config.normalized)
    chosen_rewards, rejected_rewards = rewards[:num_pairs], rewards[num_pairs:]
    z = chosen_rewards - rejected_rewards - gamma
    eps = config.label_smoothing
    if loss_type in ("sigmoid", "simpo"):
        loss = -(1 - eps) * torch.nn.functional.logsigmoid(z) \
            - eps * torch.nn.functional.logsigmoid(-z)
        dloss_dz = torch.sigmoid(z) - (1 - eps)
    elif loss_type == "robust":
        loss = (-(1 - eps) * torch.nn.functional.logsigmoid(z)
                + eps * torch.nn.functional.logsigmoid(-z)) / (1 - 2 * eps)
        dloss_dz = torch.sigmoid(z) - (1 - eps) / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = torch.relu(1 - z)
        dloss_dz = torch.where(z < 1, -1.0, 0.0)
    elif loss_type == "ipo":
        loss = ((z - 0.5) / beta) ** 2
        dloss_dz = 2 * (z - 0.5) / beta**2
    else:
        raise ValueError(f"no formula for loss_type {loss_type!r}")
    d_chosen = dloss_dz * scale[:num_pairs]
    d_rejected = -dloss_dz * scale[num_pairs:]

    chosen_counts = counts[:num_pairs]
    nll = -logps[:num_pairs] / chosen_counts
    if hard is not None:
        # MixDPO routing: hard pairs learn only the chosen response (SFT).
        loss = torch.where(hard, nll, loss)
        d_chosen = torch.where(hard, -1.0 / chosen_counts, d_chosen)
        d_rejected = torch.where(hard, 0.0, d_rejected)
    if config.sft_weight:
        loss = loss + config.sft_weight * nll
        d_chosen = d_chosen - config.sft_weight / chosen_counts
    return {"per_pair_loss": loss, "d_chosen": d_chosen, "d_rejected": d_rejected,
            "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}
