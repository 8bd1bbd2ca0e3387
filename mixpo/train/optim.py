"""Optimizers, the learning-rate schedule and step-in-backward.

- "adamw": torch.optim.AdamW, fused on GPU; its states take the parameters' dtype.
- "adamw_bf16": `BF16StateAdamW`, exp_avg / exp_avg_sq kept in bfloat16 (4 bytes per
  parameter instead of 8 for fp32 states), math in fp32. Every bf16 store (states, and the
  parameters themselves when they are bf16) uses stochastic rounding: at lr 1e-6 an update is
  far below bf16's resolution (2^-8 relative), and round-to-nearest would drop it every time;
  stochastic rounding keeps it in expectation.
- "adamw_8bit": torchao's 8-bit AdamW (optional dependency, `mixpo[8bit]`), stepped in
  slices of at most UPDATE_CHUNK elements (`SlicedAdamW8bit`).

Step-in-backward: each parameter is updated by its own optimizer from a
`register_post_accumulate_grad_hook` as soon as its gradient is complete, and the gradient is
freed at once, so at most a few gradients exist at any time instead of all of them. It is
only correct when each step has a single backward (no gradient accumulation) and no clipping
by the global norm (unknown until every gradient exists).
"""
from __future__ import annotations


import functools
import math

import torch

from mixpo.schedule import cosine_lr, learning_rate_at, set_lr  # noqa: F401 - re-exported


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor (a view: in-place updates reach the parameter)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def stochastic_round_to_bf16(values: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 rounding up or down with probability proportional to the distance, so
    E[result] = values. Adds uniform noise to the 16 low bits that bf16 drops, then
    truncates them."""
    bits = values.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _store(target: torch.Tensor, values32: torch.Tensor) -> None:
    if target.dtype == torch.bfloat16:
        target.copy_(stochastic_round_to_bf16(values32))
    else:
        target.copy_(values32)


UPDATE_CHUNK = 2**24   # elements of a parameter BF16StateAdamW updates at once (512 MiB of fp32
                       # temporaries at its 32 B per element)


def flat_chunks(numel: int) -> list[slice]:
    """Slices of at most UPDATE_CHUNK elements covering a flat tensor of `numel`."""
    return [slice(start, start + UPDATE_CHUNK) for start in range(0, numel, UPDATE_CHUNK)]


class BF16StateAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) with bf16 moment estimates.

    Works on plain tensors and on FSDP2's sharded DTensor parameters (each rank updates its
    shard). Randomness for stochastic rounding comes from the global torch RNG, which the
    trainer's checkpoints save, so resumed runs stay on the same trajectory.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict: dict) -> None:
        # torch.optim casts floating-point states to the parameter's dtype on load; the
        # moments must stay bf16 (their values were bf16, so the round trip is exact).
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param, dtype=torch.bfloat16)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.bfloat16)
        state["step"] += 1
        step = state["step"].item()
        # Flat views, updated UPDATE_CHUNK elements at a time: the fp32 temporaries of one
        # slice (about 32 B per element) instead of the whole tensor's (16 GiB for a Llama-3
        # LM head). Elementwise, so slicing changes nothing but memory.
        weights, exp_avg, exp_avg_sq = (_local(tensor).view(-1) for tensor in (
            param, state["exp_avg"], state["exp_avg_sq"]))
        grad = _local(param.grad).reshape(-1)
        for part in flat_chunks(weights.numel()):
            self._update_slice(weights[part], grad[part], exp_avg[part], exp_avg_sq[part],
                               step, group)

    @staticmethod
    def _update_slice(weights, grad, exp_avg, exp_avg_sq, step, group) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
        grad = grad.float()
        mean = exp_avg.float().mul_(beta1).add_(grad, alpha=1 - beta1)
        second = exp_avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        _store(exp_avg, mean)
        _store(exp_avg_sq, second)
        denom = (second / (1 - beta2 ** step)).sqrt_().add_(eps)
        updated = weights.float().mul_(1 - lr * weight_decay)
        updated.addcdiv_(mean, denom, value=-lr / (1 - beta1 ** step))
        _store(weights, updated)


def _make_optimizer(params: list, cfg, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                  eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, fused=device.type == "cuda", **kwargs)
    if cfg.optim == "adamw_bf16":
        return BF16StateAdamW(params, **kwargs)
    return sliced_adamw_8bit()(params, **kwargs)


def update_slices(shape, limit: int = UPDATE_CHUNK, block: int = 1):
    """Ranges [r0, r1) of a tensor's first dimension holding at most `limit` elements each (at
    least one row), each a whole number of `block`-element quantisation blocks."""
    rows = shape[0] if len(shape) else 1
    row_elements = math.prod(shape[1:]) if len(shape) > 1 else 1
    if rows * row_elements <= limit or len(shape) < 2:
        return [(0, rows)]
    step = max(1, limit // row_elements)
    align = block // math.gcd(row_elements, block)
    step = max(align, step // align * align)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


@functools.lru_cache(maxsize=None)
def sliced_adamw_8bit():
    """torchao.optim.AdamW8bit stepped UPDATE_CHUNK elements at a time: torchao's own
    per-tensor update (`single_param_adam`, compiled by torch.compile as torchao does) on
    first-dimension slices aligned to its 256-value quantisation blocks. Blockwise and
    elementwise, so slicing changes nothing but memory: the step's fp32 temporaries are a
    slice's, not the LM head's (eagerly, 13.7 GiB at Llama-3-8B)."""
    try:
        from torchao.optim import AdamW8bit
        from torchao.optim.adam import single_param_adam
    except ImportError:
        raise ValueError("optim 'adamw_8bit' needs torchao (pip install torchao)") from None

    class SlicedAdamW8bit(AdamW8bit):
        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            # One compiled graph per distinct slice shape (a handful per model).
            with torch._dynamo.utils.disable_cache_limit():
                for group in self.param_groups:
                    for param in group["params"]:
                        if param.grad is not None:
                            self._update(param, group)
            return loss

        def _update(self, param, group) -> None:
            state = self.state[param]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = self._new_buffer(param, True)
                state["exp_avg_sq"] = self._new_buffer(param, False)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = self._new_buffer(param, False)
            state["step"] += 1
            if not isinstance(group["lr"], torch.Tensor):
                raise RuntimeError("adamw_8bit's lr must stay a tensor (set it with fill_)")
            weights = _local(param.detach())
            grad = _local(param.grad)
            moments = [_local(state[key]) if key in state else None
                       for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")]
            beta1, beta2 = group["betas"]
            stochastic = self.bf16_stochastic_round and param.dtype is torch.bfloat16
            update = torch.compile(single_param_adam, fullgraph=True, dynamic=False)
            slices = update_slices(weights.shape, UPDATE_CHUNK, self.block_size)
            for r0, r1 in slices:
                tensors = [weights, grad, *moments] if len(slices) == 1 else \
                    [_rows(tensor, r0, r1) for tensor in (weights, grad, *moments)]
                update(tensors[0], tensors[1], state["step"], *tensors[2:], group["lr"],
                       beta1, beta2, group["weight_decay"], group["eps"], self.is_adamw,
                       stochastic)

    return SlicedAdamW8bit


def _rows(tensor, r0: int, r1: int):
    """tensor[r0:r1]; for torchao's 8-bit state a new state over the slices of its codes and
    block scales (a view of the subclass itself would not compile)."""
    if tensor is None or not hasattr(tensor, "codes"):
        return None if tensor is None else tensor[r0:r1]
    row, block = math.prod(tensor.shape[1:]), tensor.block_size
    return type(tensor)(tensor.codes[r0:r1], tensor.scale[r0 * row // block:r1 * row // block],
                        tensor.qmap, tensor.signed, tensor.dtype)


def build_optimizers(model: torch.nn.Module, cfg, device: torch.device) -> list:
    """One optimizer over all trainable parameters, or (step_in_backward) one per parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [[p] for p in params] if cfg.step_in_backward else [params]
    return [_make_optimizer(group, cfg, device) for group in groups]


def apply_updates(params: list, optimizers: list, max_grad_norm, grad_sq_sum=None):
    """The end of a training step; returns the gradient norm (a tensor, read on the host only
    when logged). With step-in-backward (`grad_sq_sum`, from `attach_step_in_backward`) the
    updates were made inside backward: the norm of the summed squares, which are zeroed.
    Otherwise the gradients clipped to `max_grad_norm` (0 or None: not clipped) and every
    optimizer stepped."""
    if grad_sq_sum is not None:
        grad_norm = grad_sq_sum.sqrt()
        grad_sq_sum.zero_()
        return grad_norm
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return grad_norm


def squared_norm(tensor: torch.Tensor) -> torch.Tensor:
    """sum(tensor^2) in fp32, UPDATE_CHUNK elements at a time (a whole fp32 copy of the LM
    head's gradient and its square would be 8 B per element: 3.9 GiB at Llama-3-8B)."""
    flat = tensor.reshape(-1)
    total = torch.zeros((), dtype=torch.float32, device=tensor.device)
    for part in flat_chunks(flat.numel()):
        values = flat[part].float()
        total += torch.dot(values, values)
    return total


def attach_step_in_backward(optimizers: list, device: torch.device) -> torch.Tensor:
    """Hook every parameter of the per-parameter `optimizers` so that it is updated and its
    gradient freed as soon as backward has accumulated it. Returns a one-element fp32 tensor
    that accumulates the squared gradient norm (the caller zeroes it every step)."""
    grad_sq_sum = torch.zeros(1, device=device)

    def make_hook(optimizer):
        def hook(param):
            grad_sq_sum.add_(squared_norm(_local(param.grad)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return hook

    for optimizer in optimizers:
        (param,) = optimizer.param_groups[0]["params"]
        param.register_post_accumulate_grad_hook(make_hook(optimizer))
    return grad_sq_sum
