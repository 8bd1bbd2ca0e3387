"""The logit-free backward as one tile kernel with fp32 atomics: the measured alternative to the
default GEMM backward of `mixpo.kernels.linear_logps` (`method="atomic"` there).

`_linear_atomic_bwd_kernel`, grid (token tiles x vocab tiles) in grouped order: each program
recomputes its [BLOCK_N, BLOCK_V] logits tile (tl.dot over H), forms the whole gradient
G = coef * (onehot(label) - softmax) * dz'/dz in registers and scatters dHidden += G @ W_tile
and dWeight_tile += G^T @ E with fp32 `tl.atomic_add`. With 16-bit weights it runs once per
vocab chunk (an fp32 dWeight buffer of `DWEIGHT_CHUNK_BYTES`, rounded into the 16-bit gradient
when the chunk is done). Every program adds [BLOCK_N + BLOCK_V, H] fp32 values through L2: at
Llama-3 shape (12,288 completion tokens, V 128256, H 4096, 128 x 128 tiles) 96,192 programs x
4 MiB = 403 GB of atomics, and the order of the additions, hence the low bits of the gradients,
changes from run to run. `benchmarks/roofline.py` (`linear_atomic_bwd`) counts that traffic;
`benchmarks/gpu_check.py` times this kernel against the default.

Gradient filtering (`filter_eps`, off by default): Cut Cross-Entropy's rule (Wijmans et al.,
ICLR 2025): a tile skips both products when every element |onehot - softmax| of its tokens
with a nonzero coefficient is below eps; "auto" is eps = machine epsilon / 32 of the input
dtype (2^-12 for bf16), below 16-bit resolution. Only this kernel can skip work per tile: the
default backward's GEMMs are dense.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixpo.kernels.configs import choose, dweight_chunk_rows
from mixpo.kernels.dispatch import INTERPRET
from mixpo.kernels.linear_logps import (_check, _grouped_tile, _logits_tile, _spec_name,
                                         _unit_stride)
from mixpo.kernels.logits_logps import transform_logits, transform_slope


def filter_threshold(filter_eps, dtype: torch.dtype) -> float:
    """The per-element threshold of `filter_eps`: None -> -1 (no tile skipped), "auto" ->
    torch.finfo(dtype).eps / 32 (CCE's choice), a float -> itself."""
    if filter_eps is None:
        return -1.0
    if filter_eps == "auto":
        return torch.finfo(dtype).eps / 32
    if isinstance(filter_eps, (int, float)) and filter_eps >= 0:
        return float(filter_eps)
    raise ValueError(f"filter_eps must be None, 'auto' or a float >= 0, got {filter_eps!r}")


@triton.jit
def _linear_atomic_bwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, rows_ptr, lse_ptr, coef_ptr,
    dhidden_ptr, dweight_ptr, dbias_ptr, kept_ptr, order_ptr,
    n_tokens, vocab_size, hidden_size, vocab_start, filter_eps, stride_hn, stride_wv,
    stride_dhn, stride_dwv, has_bias, dh_direct, weight_grad, logit_scale, softcap,
    UPCAST: tl.constexpr, SOFTCAP: tl.constexpr, ORDERED: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid_n, pid_v = _grouped_tile(n_tokens, vocab_size, BLOCK_N, BLOCK_V, GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_tokens
    coef = tl.load(coef_ptr + offs_n, mask=mask_n, other=0.0)
    # A token tile whose coefficients are all zero contributes nothing.
    if tl.max(tl.abs(coef), 0) > 0:
        rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
        h_rows = hidden_ptr + rows * stride_hn
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1) - vocab_start
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < vocab_size
        # ORDERED: the tile's vocab ids come from `order_ptr` (positions offs_v of the
        # vocabulary sorted by mean logit), so that entries of similar probability share tiles.
        if ORDERED:
            ids = tl.load(order_ptr + offs_v, mask=mask_v, other=0)
        else:
            ids = offs_v
        raw = _logits_tile(h_rows, mask_n, weight_ptr, bias_ptr, has_bias, ids, mask_v,
                           hidden_size, stride_wv, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)
        logits, tanh = transform_logits(raw, logit_scale, softcap, SOFTCAP)
        onehot = (labels[:, None] == ids[None, :]).to(tl.float32)
        active = (coef != 0.0)[:, None] & mask_v[None, :]
        delta = tl.where(active, onehot - tl.exp(logits - lse[:, None]), 0.0)
        # CCE's filter: skip when every |onehot - softmax| of the tile is below eps.
        if tl.max(tl.max(tl.abs(delta), 1), 0) >= filter_eps:
            tl.atomic_add(kept_ptr, 1)
            g = coef[:, None] * delta * transform_slope(tanh, logit_scale, SOFTCAP)
            if has_bias:
                tl.atomic_add(dbias_ptr + ids, tl.sum(g, 0), mask=mask_v, sem="relaxed")
            if UPCAST or (hidden_ptr.dtype.element_ty == tl.float32):
                gd = g
            else:  # tensor cores: 16-bit operands, fp32 accumulators
                gd = g.to(hidden_ptr.dtype.element_ty)
            # dHidden row of each token: its hidden row (fp32 outputs, written in place) or
            # its compacted index (an [n, H] fp32 buffer for 16-bit outputs).
            dh_rows = dhidden_ptr + tl.where(dh_direct != 0, rows, offs_n.to(tl.int64)) \
                * stride_dhn
            # dWeight rows: the weight's own (fp32, written in place) or the tile's positions
            # in the vocab chunk's fp32 buffer (16-bit; placed by the host after the chunk).
            dw_rows = dweight_ptr + tl.where(dh_direct != 0, ids, offs_v).to(tl.int64) \
                * stride_dwv
            w_rows = weight_ptr + ids.to(tl.int64) * stride_wv
            for h0 in range(0, hidden_size, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                mask_h = offs_h < hidden_size
                mask_nh = mask_n[:, None] & mask_h[None, :]
                mask_vh = mask_v[:, None] & mask_h[None, :]
                e = tl.load(h_rows[:, None] + offs_h[None, :], mask=mask_nh, other=0.0)
                w = tl.load(w_rows[:, None] + offs_h[None, :], mask=mask_vh, other=0.0)
                if UPCAST or (e.dtype == tl.float32):
                    dh = tl.dot(gd, w.to(tl.float32), input_precision="tf32x3")     # [BN, BH]
                else:
                    dh = tl.dot(gd, w)                                             # [BN, BH]
                tl.atomic_add(dh_rows[:, None] + offs_h[None, :], dh, mask=mask_nh,
                              sem="relaxed")
                if weight_grad:         # a frozen head: no dWeight product, no buffer
                    if UPCAST or (e.dtype == tl.float32):
                        dw = tl.dot(tl.trans(gd), e.to(tl.float32), input_precision="tf32x3")
                    else:
                        dw = tl.dot(tl.trans(gd), e)                               # [BV, BH]
                    tl.atomic_add(dw_rows[:, None] + offs_h[None, :], dw, mask=mask_vh,
                                  sem="relaxed")


def vocab_order(hidden, weight, bias, rows) -> torch.Tensor:
    """The vocabulary sorted by mean raw logit over the tokens hidden[rows] (CCE's vocabulary
    sorting), int32 [V]: the mean logit is the mean hidden row times the head, one [V, H]
    matrix-vector product. The logit transforms are monotone, so the raw order serves."""
    mean_hidden = hidden.index_select(0, rows).mean(0, dtype=torch.float32)
    mean_logit = torch.mv(weight, mean_hidden.to(weight.dtype)).float()
    if bias is not None:
        mean_logit += bias.float()
    return torch.argsort(mean_logit, stable=True).to(torch.int32)


def linear_token_logps_backward_atomic(hidden, weight, bias, labels, rows, lse, grad_token,
                                       logit_scale: float = 1.0, softcap=None,
                                       filter_eps=None, vocab_chunk=None, kept=None,
                                       weight_grad: bool = True, vocab_sorted: bool = False):
    """`mixpo.kernels.linear_logps.linear_token_logps_backward` with the atomic tile kernel
    (same inputs and outputs). `filter_eps`: None (exact), "auto" or a float (module
    docstring). `vocab_chunk`: vocab rows per fp32 dWeight chunk for 16-bit weights (default
    DWEIGHT_CHUNK_BYTES' worth). `kept`: an int32 [1] tensor that counts the tiles the filter
    kept (programs whose coefficients are all zero are not counted). `weight_grad=False` (a
    frozen head): dweight None, no dWeight products or buffers. `vocab_sorted`: the vocab
    tiles hold the vocabulary in `vocab_order` (entries of similar probability together, so
    the filter finds whole tiles to skip; the gradient is the same up to the order of the
    atomic additions)."""
    _check(hidden, weight, bias, labels, rows)
    hidden, weight = _unit_stride(hidden), _unit_stride(weight)
    num_tokens, (vocab_size, hidden_size) = rows.shape[0], weight.shape
    dtype, device = hidden.dtype, hidden.device
    direct = dtype == torch.float32
    dhidden = torch.zeros(hidden.shape, dtype=dtype, device=device)
    # 16-bit dweight: every row is written chunk by chunk below.
    dweight = None if not weight_grad else (torch.zeros if direct or not num_tokens
                                            else torch.empty)(weight.shape, dtype=dtype,
                                                              device=device)
    dbias = None if bias is None else torch.zeros(vocab_size, dtype=torch.float32,
                                                  device=device)
    if not num_tokens:
        return dhidden, dweight, None if dbias is None else dbias.to(bias.dtype)
    if not weight_grad:     # one pass over the vocab, dhidden's buffer a never-written pointer
        chunk_rows = vocab_size
    rows, labels = rows.contiguous(), labels.contiguous()
    coef = grad_token.float().contiguous()
    kept = torch.zeros(1, dtype=torch.int32, device=device) if kept is None else kept
    # fp32: atomics straight into dhidden's rows; 16-bit: into a compact fp32 buffer.
    dh_acc = dhidden if direct else torch.zeros(num_tokens, hidden_size, dtype=torch.float32,
                                                device=device)
    bias32 = coef if bias is None else bias.float().contiguous()      # dummy when unused
    eps = filter_threshold(filter_eps, dtype)
    launch = choose(_spec_name("linear_atomic_bwd", dtype), dtype=dtype, num_tokens=num_tokens)
    if weight_grad:
        chunk_rows = vocab_size if direct else dweight_chunk_rows(
            vocab_size, hidden_size, launch.block("BLOCK_V"), vocab_chunk)
        dw_acc = dweight if direct else torch.empty(chunk_rows, hidden_size,
                                                    dtype=torch.float32, device=device)
    lse = lse.contiguous()
    order = vocab_order(hidden, weight, bias, rows) if vocab_sorted else None
    for v0 in range(0, vocab_size, chunk_rows):
        v1 = min(v0 + chunk_rows, vocab_size)
        # The kernel sees a vocab of v1 - v0 entries (the softmax still normalises by the
        # full lse): views of this chunk's rows, labels shifted by v0; sorted, positions
        # v0..v1 of `order` into the whole head.
        dw_chunk = dw_acc[:v1 - v0] if weight_grad else dh_acc
        if not direct and weight_grad:
            dw_chunk.zero_()
        if vocab_sorted:
            chunk_weight, chunk_bias, chunk_dbias, start = weight, bias32, dbias, 0
        else:
            chunk_weight, start = weight[v0:v1], v0
            chunk_bias = bias32[v0:v1] if bias is not None else bias32
            chunk_dbias = dbias[v0:v1] if dbias is not None else None
        grid = (triton.cdiv(num_tokens, launch.block("BLOCK_N"))
                * triton.cdiv(v1 - v0, launch.block("BLOCK_V")),)
        _linear_atomic_bwd_kernel[grid](
            hidden, chunk_weight, chunk_bias, labels, rows, lse, coef, dh_acc, dw_chunk,
            coef if chunk_dbias is None else chunk_dbias, kept,
            order[v0:v1] if vocab_sorted else kept,          # (a dummy pointer unsorted)
            num_tokens, v1 - v0, hidden_size, start, eps, hidden.stride(0), weight.stride(0),
            dh_acc.stride(0), dw_chunk.stride(0), int(bias is not None), int(direct),
            int(weight_grad), float(logit_scale), float(softcap or 0.0),
            UPCAST=INTERPRET, SOFTCAP=bool(softcap), ORDERED=vocab_sorted,
            **launch.launch_kwargs())
        if not direct and weight_grad:
            if vocab_sorted:
                dweight[order[v0:v1].long()] = dw_chunk.to(dtype)
            else:
                dweight[v0:v1] = dw_chunk
    if not direct:
        dhidden[rows] = dh_acc.to(dtype)
    return (dhidden, None if dweight is None else dweight.to(weight.dtype),
            None if dbias is None else dbias.to(bias.dtype))
