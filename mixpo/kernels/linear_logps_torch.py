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
- one pass: `mixpo.kernels.linear_one_pass` (both backends), built from the pieces here.

The workspace budget is `workspace_bytes` (default `configs.DEFAULT_WORKSPACE_BYTES`).
"""
from __future__ import annotations

import torch

from mixpo.kernels.configs import DEFAULT_WORKSPACE_BYTES, choose
from mixpo.kernels.logits_logps_torch import (STAT_NAMES, _row_chunks, block_stats,
                                              transform_logits, transform_slope)

_FP32 = 4
_LSE_COLUMNS = 8192
_TWIN_BLOCK = 256          # vocab-chunk granule of the torch backward


def _fp32(tensor):
    return None if tensor is None else tensor.float()


class Workspace:
    """One uint8 buffer that a call's large temporaries are carved from: `layout` is
    [(name, shape, dtype)], each piece 16-byte aligned; `self[name]` is its typed view. The
    custom ops (`mixpo.kernels.ops`) return the buffer, so fake tensors and memory trackers
    count the memory the kernels really use. The alignment gaps are zeroed (the buffer's
    bytes are then a function of the inputs only)."""

    def __init__(self, layout, device):
        self.pieces, offset, gaps = {}, 0, []
        for name, shape, dtype in layout:
            start = -(-offset // 16) * 16
            gaps.append((offset, start))
            size = dtype.itemsize
            for dim in shape:
                size *= dim
            self.pieces[name] = (start, size, shape, dtype)
            offset = start + size
        self.buffer = torch.empty(offset, dtype=torch.uint8, device=device)
        for begin, end in gaps:
            if end > begin:
                self.buffer[begin:end] = 0

    @staticmethod
    def nbytes(layout) -> int:
        offset = 0
        for _, shape, dtype in layout:
            size = dtype.itemsize
            for dim in shape:
                size *= dim
            offset = -(-offset // 16) * 16 + size
        return offset

    def __contains__(self, name) -> bool:
        return name in self.pieces

    def __getitem__(self, name) -> torch.Tensor:
        start, size, shape, dtype = self.pieces[name]
        return self.buffer[start:start + size].view(dtype).view(shape)


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


def _forward_chunk(num_tokens: int, vocab_size: int, stats: bool, workspace_bytes=None) -> int:
    # With stats, `block_stats` holds two more blocks (log-sum-exp, probabilities) at once.
    return max(1, min(num_tokens, workspace_rows(vocab_size, _FP32 * (3 if stats else 1),
                                                 workspace_bytes)))


def forward_layout(num_tokens: int, vocab_size: int, hidden_size: int, stats: bool,
                   workspace_bytes=None, triton: bool = False) -> tuple:
    """The forward's carved temporaries: the torch backend's fp32 logits chunk [t, V] and its
    rows of hidden [t, H] (fp32); none for the Triton forward (its [splits, n] partial
    log-sum-exps are a few KiB)."""
    if triton or not num_tokens:
        return ()
    chunk = _forward_chunk(num_tokens, vocab_size, stats, workspace_bytes)
    return (("logits", (chunk * vocab_size,), torch.float32),
            ("embed", (chunk, hidden_size), torch.float32))


def backward_layout(num_tokens: int, vocab_size: int, hidden_size: int, dtype: torch.dtype,
                    workspace_bytes=None, triton: bool = False) -> tuple:
    """The GEMM backward's carved temporaries (`gemm_backward`): the softmax-gradient
    workspace [n, C] (input dtype on Triton, fp32 here), the fp32 dHidden accumulator
    [n, H], the completion rows of hidden [n, H] (same dtype as the workspace) and, when
    that is not the weight's dtype, one converted weight chunk [C, H]."""
    if not num_tokens:
        return ()
    grad_dtype = dtype if triton else torch.float32
    if triton:
        name = "linear_softmax_grad_fp32" if dtype == torch.float32 else "linear_softmax_grad"
        block_v = choose(name, dtype=dtype, num_tokens=num_tokens).block("BLOCK_V")
    else:
        block_v = _TWIN_BLOCK
    chunk = vocab_chunk_rows(num_tokens, vocab_size, grad_dtype.itemsize, block_v,
                             workspace_bytes)
    layout = [("workspace", (num_tokens * chunk,), grad_dtype),
              ("dhidden", (num_tokens, hidden_size), torch.float32),
              ("embed", (num_tokens, hidden_size), grad_dtype)]
    if dtype != grad_dtype:
        layout.append(("weight_chunk", (chunk, hidden_size), grad_dtype))
    return tuple(layout)


def gather_rows(hidden: torch.Tensor, rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[i] = hidden[rows[i]] in out's dtype, without a temporary when the dtypes agree."""
    if hidden.dtype == out.dtype:
        return torch.index_select(hidden, 0, rows, out=out)
    return out.copy_(hidden[rows])


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
                               softcap=None, stats: bool = False, workspace_bytes=None,
                               workspace=None):
    """Label log-prob and log-sum-exp of the tokens hidden[rows] under the LM head and the
    logit transform.

    hidden [N, H]; weight [V, H]; bias [V] or None; rows [n] int64 indexes into hidden (the
    completion tokens, ignored tokens compacted away); labels [n] int64 in [0, V).
    Returns (token_logps [n] fp32, lse [n] fp32, aux: "label_logit" -> the labels' raw
    logits [n], plus STAT_NAMES -> [n] with `stats`). Logits exist one [t, V] fp32 chunk of
    tokens at a time, t from `workspace_bytes`; `workspace`: a `Workspace` of
    `forward_layout` to carve them from (default: allocated here).
    """
    bias32 = _fp32(bias)
    num_tokens, (vocab_size, hidden_size) = rows.shape[0], weight.shape
    token_logps = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(token_logps)
    label_logit = torch.empty_like(token_logps)
    stat_values = torch.empty((len(STAT_NAMES) if stats else 0, num_tokens),
                              dtype=torch.float32, device=hidden.device)
    if workspace is None:
        workspace = Workspace(forward_layout(num_tokens, vocab_size, hidden_size, stats,
                                             workspace_bytes), hidden.device)
    chunk = _forward_chunk(num_tokens, vocab_size, stats, workspace_bytes)
    for t0, t1 in _row_chunks(num_tokens, chunk):
        embed = gather_rows(hidden, rows[t0:t1], workspace["embed"][:t1 - t0])
        block = _raw_logits(embed, weight, bias32,
                            workspace["logits"][:(t1 - t0) * vocab_size].view(t1 - t0,
                                                                              vocab_size))
        if softmax_path(block, logit_scale, softcap, stats):
            value = block.gather(-1, labels[t0:t1, None]).squeeze(-1)
            token_lse, _ = softmax_lse_(block, labels[t0:t1], value,
                                        raw_rows_of(embed, weight, bias32))
            raw, token_stats = value, []
        else:
            token_lse, value, raw, token_stats = _block_logps(block, labels[t0:t1],
                                                              logit_scale, softcap, stats,
                                                              keep=False)
        lse[t0:t1], label_logit[t0:t1] = token_lse, raw
        token_logps[t0:t1] = value - token_lse
        for index, value in enumerate(token_stats):
            stat_values[index, t0:t1] = value
    aux = {"label_logit": label_logit}
    if stats:
        aux.update(zip(STAT_NAMES, stat_values))
    return token_logps, lse, aux


# Below this a label's softmax probability has left fp32's normal range (logp < -86.6) and
# its logarithm lost precision: the row's log-sum-exp is recomputed exactly.
_SMALLEST_EXACT_PROB = 2.0 ** -125


def softmax_path(block, logit_scale: float, softcap, stats: bool) -> bool:
    """Whether `softmax_lse_` serves a raw logits block: plain logits (no softcap, logit
    scale 1), no statistics, on a CPU (ATen's fused row-wise softmax)."""
    return logit_scale == 1.0 and not softcap and not stats and block.is_cpu


def raw_rows_of(embed, weight, bias32):
    """`softmax_lse_`'s raw_rows for a block whose hidden rows are `embed` [t, H] fp32:
    index [k] -> the raw logits [k, V] fp32 of those rows, computed again."""
    def raw_rows(index):
        return _raw_logits(embed[index], weight, bias32, torch.empty(
            (index.shape[0], weight.shape[0]), dtype=torch.float32, device=embed.device))
    return raw_rows


def softmax_lse_(block, labels, label_logit, raw_rows):
    """(lse [t], row sums [t]) of a raw fp32 logits block [t, V] (plain logits: no
    transform), which is left holding ATen's softmax P, in one fused pass (max, exp-sum and
    scale while each row is in cache) and one read: ATen sums in fp32 lanes (relative error
    about 1e-5 at V 128k), torch.sum's cascade about 1e-7, so p = P / sums is as exact as a
    separate log-sum-exp, and lse = z_y - log p_y. Rows whose p_y left fp32's normal range
    get their log-sum-exp recomputed exactly from raw_rows(index [k]) -> raw logits [k, V].
    The CPU fast path of the forward and of the one pass (`mixpo.kernels.linear_one_pass`)."""
    torch.softmax(block, -1, out=block)
    totals = block.sum(-1)
    prob = block.gather(-1, labels[:, None]).squeeze(-1)
    lse = label_logit - (prob.log() - totals.log())
    inexact = torch.nonzero(prob < _SMALLEST_EXACT_PROB * totals).squeeze(1)
    if inexact.numel():
        lse[inexact] = torch.logsumexp(raw_rows(inexact), dim=-1)
    return lse, totals


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
    # No host read of the labels: those outside the chunk add 0 at column 0.
    inside = (labels >= 0) & (labels < block.shape[1])
    grad.scatter_add_(-1, torch.where(inside, labels, 0)[:, None],
                      torch.where(inside, coef, 0.0)[:, None])
    if softcap or logit_scale != 1.0:
        grad.mul_(slope)
    return grad


def gemm_backward(hidden, weight, bias, rows, fill, grad_dtype, block_v: int,
                  workspace_bytes, weight_grad: bool, workspace):
    """The two-pass backward's GEMMs, for both backends. Per vocab chunk [v0, v1) of C rows
    (`vocab_chunk_rows`): `fill(v0, v1, grad, weight_chunk)` writes the chunk's softmax
    gradient into the workspace `grad` [n, v1 - v0] (grad_dtype, contiguous; weight_chunk:
    weight[v0:v1] in grad_dtype); then dHidden_acc (fp32 [n, H]) += grad @ W[v0:v1]
    (`addmm_fp32`), dWeight[v0:v1] = grad^T @ embed (one GEMM over all n tokens, fp32
    accumulation, each row written once) and dbias[v0:v1] = column sums, with embed [n, H] =
    hidden[rows] in grad_dtype. The temporaries are carved from `workspace` (a `Workspace`
    of `backward_layout`, the backend's). Returns (dhidden [N, H], dweight [V, H],
    dbias [V] or None) in the input dtypes; deterministic (no atomics, fixed summation
    order). weight_grad=False (a frozen head) skips the dWeight GEMM and returns None for
    it."""
    num_tokens, vocab_size = rows.shape[0], weight.shape[0]
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
    embed = gather_rows(hidden, rows, workspace["embed"])
    dh_acc = workspace["dhidden"].zero_()
    for v0, v1 in _row_chunks(vocab_size, chunk):
        grad = workspace["workspace"][:num_tokens * (v1 - v0)].view(num_tokens, v1 - v0)
        if "weight_chunk" in workspace:
            weight_chunk = workspace["weight_chunk"][:v1 - v0]
            weight_chunk.copy_(weight[v0:v1])
        else:
            weight_chunk = weight[v0:v1]
        fill(v0, v1, grad, weight_chunk)
        addmm_fp32(dh_acc, grad, weight_chunk)
        if dweight is None:
            pass
        elif dweight.dtype == grad_dtype:
            torch.mm(grad.T, embed, out=dweight[v0:v1])
        else:           # fp32 G with 16-bit weights (this twin): one rounding per element
            dweight[v0:v1] = torch.mm(grad.T, embed)
        if dbias is not None:
            dbias[v0:v1] = grad.sum(0, dtype=torch.float32)
    dhidden[rows] = dh_acc.to(hidden.dtype)
    return dhidden, dweight, None if dbias is None else dbias.to(bias.dtype)


def linear_token_logps_backward(hidden, weight, bias, labels, rows, lse, grad_token,
                                label_logit=None, logit_scale: float = 1.0, softcap=None,
                                workspace_bytes=None, weight_grad: bool = True,
                                workspace=None):
    """Gradients of sum(grad_token * token_logps) w.r.t. hidden, weight and bias.

    Same inputs as the forward plus its lse [n] and grad_token [n] fp32 (`label_logit`, the
    Triton helper's input, is not needed here). Returns (dhidden [N, H], zero on rows not
    listed; dweight [V, H]; dbias [V] or None) in the input dtypes, accumulated in fp32:
    `gemm_backward` with G formed in fp32 (workspace [n, C] fp32; `workspace`: a
    `Workspace` of `backward_layout`); weight_grad=False skips dweight (None).
    """
    bias32, coef = _fp32(bias), grad_token.float()
    plain = bias32 is None and logit_scale == 1.0 and not softcap
    neg_lse = -lse[:, None]
    if workspace is None and rows.shape[0]:
        workspace = Workspace(backward_layout(rows.shape[0], weight.shape[0],
                                              weight.shape[1], weight.dtype, workspace_bytes),
                              hidden.device)

    def fill(v0, v1, grad, weight_chunk):
        embed = workspace["embed"]      # hidden[rows] in fp32 (written by gemm_backward)
        if plain:       # z - lse straight from the GEMM (one elementwise pass saved)
            torch.addmm(neg_lse, embed, weight_chunk.T, out=grad)
        else:
            torch.mm(embed, weight_chunk.T, out=grad)
            if bias32 is not None:
                grad += bias32[v0:v1]
            transform_logits(grad, logit_scale, softcap)
        _softmax_grad_(grad, labels - v0, lse, coef, logit_scale, softcap, shifted=plain)

    return gemm_backward(hidden, weight, bias, rows, fill, torch.float32, _TWIN_BLOCK,
                         workspace_bytes, weight_grad, workspace)
