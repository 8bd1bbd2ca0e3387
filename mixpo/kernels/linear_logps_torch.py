"""Plain-torch twin of `mixpo.kernels.linear_logps` (same functions, inputs and outputs):
logit-free token log-probs from hidden states and the LM-head weight, computed for the
completion tokens listed in `rows` only, never more logits alive than the workspace holds.

The structure is the Triton path's, so the work it saves is measured on a CPU too:
- forward: chunks of tokens, each a [t, V] fp32 logits block inside the workspace, reduced to
  log-sum-exp and label logit;
- backward (`gemm_backward`, shared with the Triton path): per vocab chunk [v0, v1), the
  softmax gradient G = coef * (onehot - softmax) * dz'/dz of every token is formed once in the
  workspace [n, v1 - v0], then two GEMMs: dHidden (fp32 [n, H]) += G @ W[v0:v1] and
  dWeight[v0:v1] = G^T @ E, each dWeight row written once, no atomics, no fp32 [V, H] copy;
- one pass (`linear_token_logps_one_pass`): groups of whole pairs, each group's logits
  [t, V] in the workspace, its log-probs handed to a caller's coefficient function (the
  per-pair loss), then G in place and its GEMMs: forward and exact gradient for 6nVH FLOPs
  instead of 8nVH.

The workspace budget is `workspace_bytes` (default `configs.DEFAULT_WORKSPACE_BYTES`).
"""
from __future__ import annotations

import torch

from mixpo.kernels.configs import DEFAULT_WORKSPACE_BYTES
from mixpo.kernels.logits_logps_torch import (STAT_NAMES, _row_chunks, block_stats,
                                              transform_logits, transform_slope)

_FP32 = 4
_LSE_COLUMNS = 8192
_TWIN_BLOCK = 256          # vocab-chunk granule of the torch backward


def _fp32(tensor):
    return None if tensor is None else tensor.float()


def workspace_rows(num_columns: int, element_bytes: int, workspace_bytes=None) -> int:
    """Rows of `num_columns` elements that fit the workspace budget (at least one)."""
    budget = DEFAULT_WORKSPACE_BYTES if workspace_bytes is None else int(workspace_bytes)
    return max(1, budget // (element_bytes * max(num_columns, 1)))


def vocab_chunk_rows(num_tokens: int, vocab_size: int, element_bytes: int, block_v: int,
                     workspace_bytes=None) -> int:
    """Vocab rows C of one backward chunk: the workspace [n, C] fits the budget, C a multiple
    of the vocab tile `block_v` (at least one tile), at most the vocabulary."""
    rows = workspace_rows(num_tokens, element_bytes, workspace_bytes)
    return min(vocab_size, max(block_v, rows // block_v * block_v))


_MM_OUT_DTYPE: dict = {}


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b without rounding the product to a's 16-bit dtype: cuBLAS with an
    fp32 output (`torch.addmm(..., out_dtype=torch.float32)`, CUDA, torch >= 2.8), else an
    fp32 product (CPU, older torch)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _MM_OUT_DTYPE.get(acc.device, True):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _MM_OUT_DTYPE[acc.device] = True
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[acc.device] = False
    acc.addmm_(a.float(), b.float())


def _raw_logits(embed32, weight, bias32, out):
    """out [t, V] fp32 = embed32 [t, H] @ weight^T (+ bias); a 16-bit weight is upcast one
    vocab chunk of about out's size at a time (no fp32 [V, H] copy)."""
    if weight.dtype == torch.float32:
        torch.mm(embed32, weight.T, out=out)
    else:
        step = max(1, out.numel() // max(weight.shape[1], 1))
        for v0, v1 in _row_chunks(weight.shape[0], step):
            out[:, v0:v1] = embed32 @ weight[v0:v1].float().T
    if bias32 is not None:
        out += bias32
    return out


def linear_token_logps_forward(hidden, weight, bias, labels, rows, logit_scale: float = 1.0,
                               softcap=None, stats: bool = False, workspace_bytes=None):
    """Label log-prob and log-sum-exp of the tokens hidden[rows] under the LM head and the
    logit transform.

    hidden [N, H]; weight [V, H]; bias [V] or None; rows [n] int64 indexes into hidden (the
    completion tokens, ignored tokens compacted away); labels [n] int64 in [0, V).
    Returns (token_logps [n] fp32, lse [n] fp32, aux: "label_logit" -> the labels' raw
    logits [n], plus STAT_NAMES -> [n] with `stats`). Logits exist one [t, V] fp32 chunk of
    tokens at a time, t from `workspace_bytes`.
    """
    bias32 = _fp32(bias)
    num_tokens, vocab_size = rows.shape[0], weight.shape[0]
    token_logps = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(token_logps)
    label_logit = torch.empty_like(token_logps)
    stat_values = torch.empty((len(STAT_NAMES) if stats else 0, num_tokens),
                              dtype=torch.float32, device=hidden.device)
    # With stats, `block_stats` holds two more blocks (log-sum-exp, probabilities) at once.
    chunk = max(1, min(num_tokens, workspace_rows(vocab_size, _FP32 * (3 if stats else 1),
                                                  workspace_bytes)))
    buffer = torch.empty(chunk * vocab_size, dtype=torch.float32, device=hidden.device)
    for t0, t1 in _row_chunks(num_tokens, chunk):
        block = _raw_logits(hidden[rows[t0:t1]].float(), weight, bias32,
                            buffer[:(t1 - t0) * vocab_size].view(t1 - t0, vocab_size))
        token_lse, value, raw, token_stats = _block_logps(block, labels[t0:t1], logit_scale,
                                                          softcap, stats, keep=False)
        lse[t0:t1], label_logit[t0:t1] = token_lse, raw
        token_logps[t0:t1] = value - token_lse
        for index, value in enumerate(token_stats):
            stat_values[index, t0:t1] = value
    aux = {"label_logit": label_logit}
    if stats:
        aux.update(zip(STAT_NAMES, stat_values))
    return token_logps, lse, aux


def _block_logps(block, labels, logit_scale, softcap, stats, keep):
    """(lse, transformed label logit, raw label logit, stats list) of a raw fp32 logits block
    [t, V], transformed in place. keep=False may also overwrite the block while reducing it;
    keep=True leaves the transformed logits in it."""
    raw = block.gather(-1, labels[:, None]).squeeze(-1)
    block = transform_logits(block, logit_scale, softcap)
    value = block.gather(-1, labels[:, None]).squeeze(-1)
    if stats:
        lse = torch.logsumexp(block, dim=-1)
        return lse, value, raw, block_stats(block, lse, labels)
    row_max = block.max(dim=-1, keepdim=True).values
    if not keep:    # log-sum-exp in place (torch.logsumexp would allocate a second block)
        return row_max.squeeze(-1) + block.sub_(row_max).exp_().sum(-1).log(), value, raw, []
    # Kept for the gradient: exp-sums over column slices (a [t, 8192] temporary at most).
    sums = torch.zeros_like(value)
    for v0, v1 in _row_chunks(block.shape[1], _LSE_COLUMNS):
        sums += (block[:, v0:v1] - row_max).exp_().sum(-1)
    return row_max.squeeze(-1) + sums.log(), value, raw, []


def _softmax_grad_(block, labels, lse, coef, logit_scale, softcap, shifted=False):
    """The transformed logits block [t, C] (vocab columns of `labels`' frame) turned in place
    into G = coef * (onehot - softmax) * dz'/dz (`shifted`: the block already holds
    z' - lse). Labels outside [0, C) add no one-hot."""
    slope = transform_slope(block.clone(), logit_scale, softcap) if softcap else logit_scale
    if not shifted:
        block.sub_(lse[:, None])
    grad = block.exp_().mul_(-coef[:, None])
    inside = (labels >= 0) & (labels < block.shape[1])
    if bool(inside.all()):
        grad.scatter_add_(-1, labels[:, None], coef[:, None])
    else:
        index = torch.nonzero(inside).squeeze(1)
        grad[index, labels[index]] += coef[index]
    if softcap or logit_scale != 1.0:
        grad.mul_(slope)
    return grad


def gemm_backward(hidden, weight, bias, rows, embed, fill, grad_dtype, block_v: int,
                  workspace_bytes=None, weight_grad: bool = True):
    """The two-pass backward's GEMMs, for both backends. Per vocab chunk [v0, v1) of C rows
    (`vocab_chunk_rows`): `fill(v0, v1, grad)` writes the chunk's softmax gradient into the
    workspace `grad` [n, v1 - v0] (grad_dtype, contiguous); then dHidden_acc (fp32 [n, H]) +=
    grad @ W[v0:v1] (`addmm_fp32`), dWeight[v0:v1] = grad^T @ embed (one GEMM over all n
    tokens, fp32 accumulation, each row written once) and dbias[v0:v1] = column sums.
    embed [n, H] = hidden[rows] in grad_dtype. Returns (dhidden [N, H], dweight [V, H], dbias
    [V] or None) in the input dtypes; deterministic (no atomics, fixed summation order).
    weight_grad=False (a frozen head) skips the dWeight GEMM and returns None for it."""
    num_tokens, (vocab_size, hidden_size) = rows.shape[0], weight.shape
    device = hidden.device
    dhidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=device)
    dbias = None if bias is None else torch.zeros(vocab_size, dtype=torch.float32,
                                                  device=device)
    if not num_tokens:
        return (dhidden, torch.zeros_like(weight) if weight_grad else None,
                None if bias is None else dbias.to(bias.dtype))
    dweight = torch.empty(weight.shape, dtype=weight.dtype, device=device) if weight_grad \
        else None
    chunk = vocab_chunk_rows(num_tokens, vocab_size, grad_dtype.itemsize, block_v,
                             workspace_bytes)
    workspace = torch.empty(num_tokens * chunk, dtype=grad_dtype, device=device)
    dh_acc = torch.zeros(num_tokens, hidden_size, dtype=torch.float32, device=device)
    for v0, v1 in _row_chunks(vocab_size, chunk):
        grad = workspace[:num_tokens * (v1 - v0)].view(num_tokens, v1 - v0)
        fill(v0, v1, grad)
        weight_chunk = weight[v0:v1].to(grad_dtype)
        addmm_fp32(dh_acc, grad, weight_chunk)
        if dweight is None:
            pass
        elif dweight.dtype == grad_dtype:
            torch.mm(grad.T, embed, out=dweight[v0:v1])
        else:           # fp32 G with 16-bit weights (this twin): one rounding per element
            dweight[v0:v1] = grad.T @ embed
        if dbias is not None:
            dbias[v0:v1] = grad.sum(0, dtype=torch.float32)
    dhidden[rows] = dh_acc.to(hidden.dtype)
    return dhidden, dweight, None if dbias is None else dbias.to(bias.dtype)


def linear_token_logps_backward(hidden, weight, bias, labels, rows, lse, grad_token,
                                label_logit=None, logit_scale: float = 1.0, softcap=None,
                                workspace_bytes=None, weight_grad: bool = True):
    """Gradients of sum(grad_token * token_logps) w.r.t. hidden, weight and bias.

    Same inputs as the forward plus its lse [n] and grad_token [n] fp32 (`label_logit`, the
    Triton helper's input, is not needed here). Returns (dhidden [N, H], zero on rows not
    listed; dweight [V, H]; dbias [V] or None) in the input dtypes, accumulated in fp32:
    `gemm_backward` with G formed in fp32 (workspace [n, C] fp32); weight_grad=False skips
    dweight (None).
    """
    embed = hidden[rows].float()
    bias32, coef = _fp32(bias), grad_token.float()

    plain = bias32 is None and logit_scale == 1.0 and not softcap
    neg_lse = -lse[:, None]

    def fill(v0, v1, grad):
        if plain:       # z - lse straight from the GEMM (one elementwise pass saved)
            torch.addmm(neg_lse, embed, weight[v0:v1].float().T, out=grad)
        else:
            torch.mm(embed, weight[v0:v1].float().T, out=grad)
            if bias32 is not None:
                grad += bias32[v0:v1]
            transform_logits(grad, logit_scale, softcap)
        _softmax_grad_(grad, labels - v0, lse, coef, logit_scale, softcap, shifted=plain)

    return gemm_backward(hidden, weight, bias, rows, embed, fill, torch.float32, _TWIN_BLOCK,
                         workspace_bytes, weight_grad)


class TorchGroupOps:
    """The one pass's elementwise steps on a group's raw fp32 logits block [t, V], in torch
    (the Triton backend plugs in the `token_logps` kernels instead). `logps` leaves
    q = exp(z' - row max) in the block and returns its row sums as the state, so `grad_`
    needs one multiply: G = coef * (onehot - q / sum) * dz'/dz."""

    @staticmethod
    def logps(block, labels, logit_scale, softcap, stats):
        """(lse [t], transformed label logit [t], stats list, state for `grad_`)."""
        block = transform_logits(block, logit_scale, softcap)
        value = block.gather(-1, labels[:, None]).squeeze(-1)
        slope = transform_slope(block.clone(), logit_scale, softcap) if softcap \
            else logit_scale
        token_stats = []
        if stats:
            token_stats = block_stats(block, torch.logsumexp(block, dim=-1), labels)
        row_max = block.max(dim=-1, keepdim=True).values
        sums = block.sub_(row_max).exp_().sum(-1)
        return row_max.squeeze(-1) + sums.log(), value, token_stats, (sums, slope)

    @staticmethod
    def grad_(block, labels, lse, coef, logit_scale, softcap, state):
        sums, slope = state
        grad = block.mul_((-coef / sums)[:, None])          # -coef * softmax
        grad.scatter_add_(-1, labels[:, None], coef[:, None])
        if softcap or logit_scale != 1.0:
            grad.mul_(slope)
        return grad


def linear_token_logps_one_pass(hidden, weight, bias, labels, rows, groups, coefficients,
                                logit_scale: float = 1.0, softcap=None, stats: bool = False,
                                weight_grad: bool = True, ops=TorchGroupOps):
    """Forward and exact backward in one pass over `groups` of tokens.

    hidden, weight, bias, labels [n], rows [n] as in the forward; groups: index tensors into
    the n tokens, disjoint, covering them, each closed under the coefficient function (whole
    pairs); coefficients(k, token_logps [t], aux [t] dict) -> d loss / d token log-prob [t]
    fp32 of group k (its position in `groups`), called once per group, in order, as soon as
    its log-probs exist.
    Per group: logits [t, V] fp32 (the workspace: callers size groups to their budget),
    log-sum-exp, label log-probs and stats (`ops.logps`), the coefficients, G in place
    (`ops.grad_`; `ops`: TorchGroupOps or the Triton backend's kernels), dHidden rows =
    G @ W (written once), dWeight += G^T @ E. dWeight accumulates in the output for fp32
    weights; 16-bit weights need an fp32 [V, H] accumulator when there is more than one group.
    Returns (token_logps [n], lse [n], aux as the forward's, dhidden [N, H], dweight [V, H]
    or None with weight_grad=False, dbias [V] or None), gradients in the input dtypes.
    """
    num_tokens, (vocab_size, _) = rows.shape[0], weight.shape
    device, dtype = hidden.device, hidden.dtype
    bias32 = _fp32(bias)
    token_logps = torch.empty(num_tokens, dtype=torch.float32, device=device)
    lse = torch.empty_like(token_logps)
    label_logit = torch.empty_like(token_logps)
    stat_values = torch.empty((len(STAT_NAMES) if stats else 0, num_tokens),
                              dtype=torch.float32, device=device)
    dhidden = torch.zeros(hidden.shape, dtype=dtype, device=device)
    direct = weight.dtype == torch.float32 or len(groups) == 1
    dweight = torch.zeros(weight.shape, dtype=weight.dtype if direct else torch.float32,
                          device=device) if weight_grad else None
    dbias = None if bias is None else torch.zeros(vocab_size, dtype=torch.float32,
                                                  device=device)
    largest = max((len(group) for group in groups), default=0)
    buffer = torch.empty(largest * vocab_size, dtype=torch.float32, device=device)
    for position, group in enumerate(groups):
        count = len(group)
        if not count:
            continue
        group_rows, group_labels = rows[group], labels[group]
        embed = hidden[group_rows].float()
        block = _raw_logits(embed, weight, bias32,
                            buffer[:count * vocab_size].view(count, vocab_size))
        raw = block.gather(-1, group_labels[:, None]).squeeze(-1)
        group_lse, value, group_stats, state = ops.logps(block, group_labels, logit_scale,
                                                         softcap, stats)
        group_logps = value - group_lse
        token_logps[group], lse[group], label_logit[group] = group_logps, group_lse, raw
        for index, stat in enumerate(group_stats):
            stat_values[index, group] = stat
        coef = coefficients(position, group_logps,
                            {"label_logit": raw, **dict(zip(STAT_NAMES, group_stats))})
        grad = ops.grad_(block, group_labels, group_lse, coef.float(), logit_scale, softcap,
                         state)
        if weight.dtype == torch.float32:
            dhidden[group_rows] = (grad @ weight).to(dtype)
            if dweight is not None:
                dweight.addmm_(grad.T, embed)
        else:
            grad16 = grad.to(weight.dtype)
            dh = torch.zeros(count, weight.shape[1], dtype=torch.float32, device=device)
            addmm_fp32(dh, grad16, weight)
            dhidden[group_rows] = dh.to(dtype)
            if dweight is None:
                pass
            elif direct:
                torch.mm(grad16.T, embed.to(weight.dtype), out=dweight)
            else:
                addmm_fp32(dweight, grad16.T, embed.to(weight.dtype))
        if dbias is not None:
            dbias += grad.sum(0)
    aux = {"label_logit": label_logit}
    if stats:
        aux.update(zip(STAT_NAMES, stat_values))
    return (token_logps, lse, aux, dhidden,
            None if dweight is None else dweight.to(weight.dtype),
            None if dbias is None else dbias.to(bias.dtype))
