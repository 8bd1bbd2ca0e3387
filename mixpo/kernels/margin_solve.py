"""gamma-PO margin solve on the GPU: one program holds the whole solve set in registers and
runs the multiplicative-weights updates (mirror descent on the simplex). Twin:
`mixpo.kernels.margin_solve_torch.solve_margins`."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixpo.kernels.configs import MAX_SOLVE_SET, choose


@triton.jit
def _margin_solve_kernel(gaps_ptr, gamma_ptr, num, gamma0, tau, eta, updates,
                         BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < num
    gaps = tl.load(gaps_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    num_f = num.to(tl.float32)
    probs = tl.where(mask, 1.0 / num_f, 0.0)
    for _ in range(updates):
        grad = tau * (1.0 + tl.log(num_f * (probs + 1e-10))) \
            + gamma0 * tl.sigmoid(gamma0 * num_f * probs - gaps)
        probs = tl.where(mask, probs * tl.exp(-eta * grad), 0.0)
        probs = probs / tl.sum(probs, axis=0)
    tl.store(gamma_ptr + offsets, gamma0 * num_f * probs, mask=mask)


def solve_margins(gaps: torch.Tensor, gamma0: float, tau: float, iters: int = 20):
    """gamma [N] fp32 for the solve set's reward gaps [N]; same contract as the twin."""
    num = gaps.shape[0]
    if num > MAX_SOLVE_SET:
        raise ValueError(f"reward_gaps: solve set of {num} exceeds {MAX_SOLVE_SET}")
    gaps = gaps.float().contiguous()
    gamma = torch.empty_like(gaps)
    launch = choose("margin_solve", num=num)
    _margin_solve_kernel[(1,)](gaps, gamma, num, float(gamma0), float(tau),
                               min(0.5 / tau, 1.0), iters - 1, **launch.launch_kwargs())
    return gamma
