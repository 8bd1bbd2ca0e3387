"""Plain-torch twin of `mixpo.kernels.margin_solve`: gamma-PO's margin solve."""
from __future__ import annotations

import torch


def solve_margins(gaps: torch.Tensor, gamma0: float, tau: float, iters: int = 20):
    """Multiplicative-weights (mirror descent on the simplex) solve of gamma-PO's margins.

    gaps [N] fp32: reward gaps of the solve set. Returns gamma [N] = gamma0 * N * p, where p
    starts uniform and takes `iters - 1` updates p <- p * exp(-eta * g), renormalised, with
    g = tau * (1 + log(N * (p + 1e-10))) + gamma0 * sigmoid(gamma0 * N * p - gap) and
    eta = min(0.5 / tau, 1). The authors' loop forms gamma before its last update, so
    `iters` loop turns apply `iters - 1` updates; we reproduce that.
    """
    num = gaps.shape[0]
    gaps = gaps.float()
    eta = min(0.5 / tau, 1.0)
    probs = torch.full_like(gaps, 1.0 / num)
    for _ in range(iters - 1):
        grad = tau * (1 + torch.log(num * (probs + 1e-10))) \
            + gamma0 * torch.sigmoid(gamma0 * num * probs - gaps)
        probs = probs * torch.exp(-eta * grad)
        probs = probs / probs.sum()
    return gamma0 * num * probs
