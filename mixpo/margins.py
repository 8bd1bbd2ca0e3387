"""gamma-PO adaptive target margins (Sun et al., github sunjie279/gammaPO).

Each call solves a small mirror-descent problem over the batch's reward gaps plus a sample of
recent gaps from a FIFO queue, and returns one target margin per pair: pairs with a larger
reward gap get a larger margin, the mean over the solve set stays gamma0, and all are >= 0.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from mixpo.kernels.dispatch import check_backend, use_triton
from mixpo.kernels.ops import solve_margins


class AdaptiveMargin:
    """Stateful gamma-PO margin solver, checkpointable with state_dict()/load_state_dict().

    Args:
        gamma0: mean target margin (gamma-SimPO: beta * gamma_beta_ratio).
        tau: regularisation towards uniform margins (bigger = closer to gamma0 everywhere).
        queue_size: FIFO capacity of past reward gaps (authors: 2048).
        solve_size: size of the solve set, queue sample + current batch (authors: 256).
        iters: mirror-descent loop turns (authors: 20; the last turn's update is not used,
            as in their code).
        seed: seeds the initial queue and the queue sampling (torch CPU generator).
        init_queue: None = the authors' 8 N(0, 1) values drawn from `seed`; a list of floats
            replaces them (an empty list starts with an empty queue).
        center: return gamma_i - gamma0 (the authors' gamma-DPO variant: a zero-mean shift of
            a zero base margin) instead of gamma_i.
        backend: "auto" (Triton kernel for CUDA gaps, torch otherwise), "triton" or "torch".
        check_finite: raise on NaN/inf reward gaps (a host sync; the trainer turns it off and
            watches the loss instead).

    Calling it with the batch's reward gaps [b] returns detached margins [b] (fp32, on the
    gaps' device); afterwards the gaps are pushed into the queue. The queue is a tensor on the
    gaps' device and the sample indices come from a CPU generator, so a call never waits on
    the device and sampling is exactly reproducible on any device.
    """

    def __init__(self, gamma0: float, tau: float, queue_size: int = 2048, solve_size: int = 256,
                 iters: int = 20, seed: int = 0, init_queue=None, center: bool = False,
                 backend: str = "auto", check_finite: bool = True):
        if not (isinstance(gamma0, (int, float)) and math.isfinite(gamma0) and gamma0 >= 0):
            raise ValueError(f"gamma0 must be a finite float >= 0, got {gamma0!r}")
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a finite float > 0, got {tau!r}")
        for name, value in (("queue_size", queue_size), ("solve_size", solve_size),
                            ("iters", iters)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        check_backend(backend)
        self.gamma0, self.tau = float(gamma0), float(tau)
        self.queue_size, self.solve_size, self.iters = queue_size, solve_size, iters
        self.center, self.backend, self.check_finite = center, backend, check_finite
        self.generator = torch.Generator().manual_seed(seed)
        if init_queue is None:
            init_queue = torch.randn(8, generator=self.generator).tolist()
        init_queue = [float(value) for value in init_queue]
        if not all(math.isfinite(value) for value in init_queue):
            raise ValueError("init_queue must contain finite values")
        self._queue = torch.tensor(init_queue[-queue_size:], dtype=torch.float32)
        self._length = self._queue.numel()

    @classmethod
    def from_options(cls, options, seed: int, **settings) -> "AdaptiveMargin | None":
        """gamma-PO's solver as a run's options describe it (mixpo's TrainConfig, the TRL
        integration's MixpoDPOConfig: adaptive_margin, gamma, margin_tau, margin_center and
        the loss types), or None without adaptive_margin: the one place both front doors
        resolve it. gamma0 is `gamma`, or the loss types' default margin (simpo 0.5)."""
        if not options.adaptive_margin:
            return None
        gamma0 = replace(options.loss_config(), gamma=options.gamma).fixed_gamma
        return cls(gamma0, options.margin_tau, seed=seed, center=options.margin_center,
                   **settings)

    @property
    def evaluation_gamma(self) -> float:
        """The fixed margin of evaluation batches (they never enter the queue): the mean
        margin gamma0, or 0 for gamma-DPO's centred margins."""
        return 0.0 if self.center else self.gamma0

    @property
    def queue(self) -> list:
        """The queue's values, oldest first (a host copy)."""
        return self._queue.tolist()

    def __call__(self, reward_gaps: torch.Tensor) -> torch.Tensor:
        if not isinstance(reward_gaps, torch.Tensor) or reward_gaps.ndim != 1 \
                or reward_gaps.numel() == 0:
            raise ValueError("reward_gaps must be a non-empty 1-D tensor [b]")
        gaps = reward_gaps.detach().float()
        if self.check_finite and not torch.isfinite(gaps).all():
            raise ValueError("reward_gaps contain NaN or inf")
        queue = self._queue.to(gaps.device)
        batch = gaps.shape[0]
        # Sample k past gaps uniformly without replacement; the solve set is [sample, batch].
        num_sampled = max(0, min(self._length, self.solve_size - batch))
        if num_sampled:
            picks = torch.randperm(self._length, generator=self.generator)[:num_sampled]
            solve_set = torch.cat([queue[picks.to(gaps.device)], gaps])
        else:
            solve_set = gaps
        gamma = self._solve(solve_set)[num_sampled:]
        self._queue = torch.cat([queue, gaps])[-self.queue_size:]
        self._length = min(self._length + batch, self.queue_size)
        if self.center:
            gamma = gamma - self.gamma0
        return gamma.detach()

    def _solve(self, solve_set: torch.Tensor) -> torch.Tensor:
        return solve_margins(solve_set, self.gamma0, self.tau, self.iters,
                             use_triton(self.backend, solve_set))

    def state_dict(self) -> dict:
        return {"queue": self.queue, "generator": self.generator.get_state(),
                "gamma0": self.gamma0, "tau": self.tau, "queue_size": self.queue_size,
                "solve_size": self.solve_size, "iters": self.iters, "center": self.center}

    def load_state_dict(self, state: dict) -> None:
        for key in ("gamma0", "tau", "queue_size", "solve_size", "iters", "center"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"state_dict was saved with {key}={state[key]!r}, "
                                 f"this solver has {getattr(self, key)!r}")
        values = [float(v) for v in state["queue"]][-self.queue_size:]
        self._queue = torch.tensor(values, dtype=torch.float32)
        self._length = len(values)
        self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return (f"AdaptiveMargin(gamma0={self.gamma0}, tau={self.tau}, queue={self._length}/"
                f"{self.queue_size}, solve_size={self.solve_size}, iters={self.iters}, "
                f"center={self.center})")
