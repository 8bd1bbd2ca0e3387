"""mixpo's kernels as `torch.library` custom ops: each op runs the Triton kernel or its torch
twin (`triton`), has a fake implementation (shapes and dtypes only: the loss runs on
`FakeTensorMode` at any size, and under `torch.compile` without graph breaks) and, for the
differentiable ones, a registered autograd formula whose backward is another op.

    mixpo::logits_token_logps           logits [S, T, V] -> token log-probs [S, T], lse, stats
    mixpo::logits_token_logps_backward  (and `_`: in place into the logits)
    mixpo::linear_token_logps           hidden [N, H], weight [V, H], rows [n] -> [n] values
    mixpo::linear_token_logps_backward
    mixpo::solve_margins                gamma-PO's margin solve (not differentiable)

The logit-free ops return their working memory (`workspace`, a uint8 buffer that the
kernels' large temporaries are carved from: `linear_logps_torch.Workspace`), so that memory
trackers and fake tensors see the bytes a step really uses; callers drop it at once. No
argument checks here (`mixpo.losses` does them); autocast is off inside the ops (their inputs
arrive in the dtype to compute in).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mixpo.kernels.dispatch import kernel_ops
from mixpo.kernels.linear_logps_torch import (Workspace, backward_layout, forward_layout)
from mixpo.kernels.logits_logps_torch import STAT_NAMES


def no_autocast(tensor: Tensor):
    return torch.autocast(tensor.device.type, enabled=False)


def _empty_workspace(layout, like: Tensor) -> Tensor:
    return like.new_empty(Workspace.nbytes(layout), dtype=torch.uint8)


# ----------------------------------------------------------------------------------------------
# Token log-probs over materialised logits
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("mixpo::logits_token_logps", mutates_args=())
def logits_token_logps(logits: Tensor, labels: Tensor, ignore_index: int, logit_scale: float,
                       softcap: Optional[float], stats: bool, inplace_backward: bool,
                       triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(token_logps [S, T] fp32, lse [S, T] fp32, stats [4 or 0, S, T] fp32) of logits
    [S, T, V] and labels [S, T] (0 where ignored; `mixpo.kernels.logits_logps`).
    `inplace_backward`: the backward writes d loss / d logits into the logits."""
    with no_autocast(logits):
        token_logps, lse, values = kernel_ops("logits_logps", triton).token_logps_forward(
            logits, labels, ignore_index, logit_scale, softcap, stats)
    stat_values = torch.stack([values[name] for name in STAT_NAMES]) if stats \
        else token_logps.new_empty((0, *token_logps.shape))
    return token_logps, lse, stat_values


@logits_token_logps.register_fake
def _(logits, labels, ignore_index, logit_scale, softcap, stats, inplace_backward, triton):
    shape = logits.shape[:2]
    return (logits.new_empty(shape, dtype=torch.float32),
            logits.new_empty(shape, dtype=torch.float32),
            logits.new_empty((len(STAT_NAMES) if stats else 0, *shape), dtype=torch.float32))


@torch.library.custom_op("mixpo::logits_token_logps_backward", mutates_args=())
def logits_token_logps_backward(logits: Tensor, labels: Tensor, lse: Tensor, coef: Tensor,
                                ignore_index: int, logit_scale: float,
                                softcap: Optional[float], triton: bool) -> Tensor:
    """d loss / d logits [S, T, V] (logits' dtype) = coef * (onehot - softmax) * dz'/dz."""
    with no_autocast(logits):
        return kernel_ops("logits_logps", triton).token_logps_backward(
            logits, labels, lse, coef, ignore_index, False, logit_scale, softcap)


@logits_token_logps_backward.register_fake
def _(logits, labels, lse, coef, ignore_index, logit_scale, softcap, triton):
    return torch.empty_like(logits)


@torch.library.custom_op("mixpo::logits_token_logps_backward_", mutates_args=("logits",))
def logits_token_logps_backward_(logits: Tensor, labels: Tensor, lse: Tensor, coef: Tensor,
                                 ignore_index: int, logit_scale: float,
                                 softcap: Optional[float], triton: bool) -> None:
    """`logits_token_logps_backward` written into `logits` itself (flash-attention style: no
    second [S, T, V] buffer; the logits are consumed)."""
    with no_autocast(logits):
        kernel_ops("logits_logps", triton).token_logps_backward(
            logits, labels, lse, coef, ignore_index, True, logit_scale, softcap)


@logits_token_logps_backward_.register_fake
def _(logits, labels, lse, coef, ignore_index, logit_scale, softcap, triton):
    return None


def _logits_setup(ctx, inputs, output):
    logits, labels, ignore_index, logit_scale, softcap, _, inplace, triton = inputs
    ctx.save_for_backward(logits, labels, output[1])
    ctx.options = (ignore_index, logit_scale, softcap, triton)
    ctx.inplace = inplace
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)


def _logits_backward(ctx, grad_token, _grad_lse, _grad_stats):
    logits, labels, lse = ctx.saved_tensors
    coef = lse.new_zeros(lse.shape) if grad_token is None else grad_token.float().contiguous()
    if ctx.inplace:
        logits_token_logps_backward_(logits, labels, lse, coef, *ctx.options)
        dlogits = logits
    else:
        dlogits = logits_token_logps_backward(logits, labels, lse, coef, *ctx.options)
    return (dlogits,) + (None,) * 7


logits_token_logps.register_autograd(_logits_backward, setup_context=_logits_setup)


# ----------------------------------------------------------------------------------------------
# Logit-free token log-probs (hidden x LM-head weight, never [n, V] at once)
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("mixpo::linear_token_logps", mutates_args=())
def linear_token_logps(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                       rows: Tensor, logit_scale: float, softcap: Optional[float], stats: bool,
                       workspace_bytes: Optional[int],
                       triton: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(token_logps [n], lse [n], label_logit [n], stats [4 or 0, n], all fp32; workspace
    uint8) of the tokens hidden[rows] (hidden [N, H], weight [V, H], labels [n] in [0, V);
    `mixpo.kernels.linear_logps`)."""
    layout = forward_layout(rows.shape[0], weight.shape[0], weight.shape[1], stats,
                            workspace_bytes, triton)
    workspace = Workspace(layout, hidden.device)
    with no_autocast(hidden):
        token_logps, lse, aux = kernel_ops("linear_logps", triton).linear_token_logps_forward(
            hidden, weight, bias, labels, rows, logit_scale, softcap, stats,
            workspace_bytes=workspace_bytes, workspace=workspace)
    stat_values = torch.stack([aux[name] for name in STAT_NAMES]) if stats \
        else token_logps.new_empty((0, token_logps.shape[0]))
    return token_logps, lse, aux["label_logit"], stat_values, workspace.buffer


@linear_token_logps.register_fake
def _(hidden, weight, bias, labels, rows, logit_scale, softcap, stats, workspace_bytes,
      triton):
    num_tokens = rows.shape[0]
    layout = forward_layout(num_tokens, weight.shape[0], weight.shape[1], stats,
                            workspace_bytes, triton)
    vector = lambda: hidden.new_empty(num_tokens, dtype=torch.float32)   # noqa: E731
    return (vector(), vector(), vector(),
            hidden.new_empty((len(STAT_NAMES) if stats else 0, num_tokens),
                             dtype=torch.float32),
            _empty_workspace(layout, hidden))


@torch.library.custom_op("mixpo::linear_token_logps_backward", mutates_args=())
def linear_token_logps_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                labels: Tensor, rows: Tensor, lse: Tensor, grad_token: Tensor,
                                label_logit: Tensor, logit_scale: float,
                                softcap: Optional[float], workspace_bytes: Optional[int],
                                weight_grad: bool,
                                triton: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dhidden [N, H], dweight [V, H] (empty without weight_grad), dbias [V] (empty without
    bias), workspace) of sum(grad_token * token_logps): the GEMM backward per vocab chunk."""
    layout = backward_layout(rows.shape[0], weight.shape[0], weight.shape[1], weight.dtype,
                             workspace_bytes, triton)
    workspace = Workspace(layout, hidden.device)
    with no_autocast(hidden):
        dhidden, dweight, dbias = kernel_ops("linear_logps", triton) \
            .linear_token_logps_backward(hidden, weight, bias, labels, rows, lse, grad_token,
                                         label_logit, logit_scale, softcap,
                                         workspace_bytes=workspace_bytes,
                                         weight_grad=weight_grad, workspace=workspace)
    return (dhidden, weight.new_empty(0) if dweight is None else dweight,
            weight.new_empty(0) if dbias is None else dbias, workspace.buffer)


@linear_token_logps_backward.register_fake
def _(hidden, weight, bias, labels, rows, lse, grad_token, label_logit, logit_scale, softcap,
      workspace_bytes, weight_grad, triton):
    layout = backward_layout(rows.shape[0], weight.shape[0], weight.shape[1], weight.dtype,
                             workspace_bytes, triton)
    return (torch.empty_like(hidden),
            torch.empty_like(weight) if weight_grad else weight.new_empty(0),
            weight.new_empty(0) if bias is None else torch.empty_like(bias),
            _empty_workspace(layout, hidden))


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, labels, rows, logit_scale, softcap, _, workspace_bytes, triton = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, rows, output[1], output[2])
    ctx.options = (logit_scale, softcap, workspace_bytes)
    ctx.triton = triton
    ctx.mark_non_differentiable(*output[1:])
    # No zeros for the outputs without a gradient (the workspace is hundreds of MiB).
    ctx.set_materialize_grads(False)


def _linear_backward(ctx, grad_token, *_):
    hidden, weight, bias, labels, rows, lse, label_logit = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_token = lse.new_zeros(lse.shape) if grad_token is None else \
        grad_token.float().contiguous()
    dhidden, dweight, dbias, _ = linear_token_logps_backward(
        hidden, weight, bias, labels, rows, lse, grad_token, label_logit,
        *ctx.options, needs[1], ctx.triton)
    return (dhidden, dweight if needs[1] else None,
            dbias if bias is not None and needs[2] else None) + (None,) * 7


linear_token_logps.register_autograd(_linear_backward, setup_context=_linear_setup)


# ----------------------------------------------------------------------------------------------
# gamma-PO's margin solve
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("mixpo::solve_margins", mutates_args=())
def solve_margins(gaps: Tensor, gamma0: float, tau: float, iters: int, triton: bool) -> Tensor:
    """gamma [N] fp32 for the solve set's reward gaps [N] (`mixpo.kernels.margin_solve`)."""
    return kernel_ops("margin_solve", triton).solve_margins(gaps, gamma0, tau, iters)


@solve_margins.register_fake
def _(gaps, gamma0, tau, iters, triton):
    return gaps.new_empty(gaps.shape, dtype=torch.float32)
