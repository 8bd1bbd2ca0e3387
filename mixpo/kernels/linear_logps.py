"""Logit-free token log-probs under an LM head: hidden [N, H] x weight [V, H]^T, never [N, V].

Twin of `mixpo.reference.linear_token_logps_forward / _backward` (same inputs and outputs).
Cut-Cross-Entropy-style tiling: each program multiplies a tile of tokens by a tile of vocab
rows of the weight in SRAM (tl.dot over BLOCK_H chunks of H, fp32 accumulation), and only
per-token quantities leave the forward (log-sum-exp and the label's logit); the backward
recomputes each [BLOCK_N, BLOCK_V] logits tile, turns it into coef * (onehot - softmax) and
scatters its two products into dHidden and dWeight with fp32 atomics.

Forward grid  (token tiles, vocab splits): a program loops over the vocab tiles of its split
              with an online log-sum-exp; the splits' partial LSEs ([splits, n] floats) are
              combined on the host side. Splits exist only to fill the GPU when n is small.
Backward grid (token tiles x vocab tiles), grouped so GROUP_N token tiles sweep the vocab
              together (weight tiles are shared in L2, atomics to one address are spread).
              Tiles whose gradient is negligible skip the two products (see FILTER below),
              and token tiles whose coefficients are all zero (e.g. the rejected responses of
              MixDPO's hard pairs) skip everything.

Compacted rows: the kernels read hidden rows through the `rows` index array, so prompt and
padding rows are never copied or multiplied. All offsets into hidden, weight and the gradient
buffers are int64.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Filtering in the backward: a [BLOCK_N, BLOCK_V] tile is skipped when, for every token row i
# of the tile, sum_v |coef_i * (onehot - p_iv)| <= eps * |coef_i|. The gradient mass dropped for
# one token over the whole vocab is then at most (V / BLOCK_V) * eps * |coef_i|: with the values
# below that is < 2^-19 |coef_i| for fp32 and < 2^-9 |coef_i| for 16-bit dtypes at V = 256k,
# under their rounding. Random (untrained) heads have a flat softmax and never skip; a trained
# LM's peaked softmax skips most tiles.
FILTER_EPS = {torch.float32: 2.0**-30, torch.bfloat16: 2.0**-20, torch.float16: 2.0**-20}

_TL_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(h_row_ptrs, mask_n, weight_ptr, bias_ptr, offs_v, mask_v, hidden_size,
                 stride_hh, stride_wv, stride_wh,
                 HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """fp32 logits [BLOCK_N, BLOCK_V] of the token rows `h_row_ptrs` (pointers to the start
    of each hidden row) against vocab rows `offs_v`; columns outside the vocab are -inf."""
    # Pointers to the start of each weight row of the tile (int64: V * H may pass 2^31).
    w_row_ptrs = weight_ptr + offs_v.to(tl.int64) * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, hidden_size, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < hidden_size
        e = tl.load(h_row_ptrs[:, None] + offs_h[None, :] * stride_hh,
                    mask=mask_n[:, None] & mask_h[None, :], other=0.0)       # [BN, BH]
        w = tl.load(w_row_ptrs[:, None] + offs_h[None, :] * stride_wh,
                    mask=mask_v[:, None] & mask_h[None, :], other=0.0)       # [BV, BH]
        if DOT_FP32:  # fp32 inputs, or the interpreter (its 16-bit tl.dot is wrong)
            e = e.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(e, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return tl.where(mask_v[None, :], acc, float("-inf"))


@triton.jit
def _linear_logps_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, rows_ptr,
    part_lse_ptr, label_logit_ptr,
    n_tokens, vocab_size, hidden_size, tiles_per_split,
    stride_hn, stride_hh, stride_wv, stride_wh,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_tokens
    # Compacted token i lives in hidden row rows[i]; pointer to the start of that row.
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0)
    h_row_ptrs = hidden_ptr + rows.to(tl.int64) * stride_hn
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1)

    # This split covers vocab [v_begin, v_end): `tiles_per_split` whole tiles, the last split
    # ending at the vocab size.
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, vocab_size)
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    label_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        logits = _logits_tile(h_row_ptrs, mask_n, weight_ptr, bias_ptr, offs_v, mask_v,
                              hidden_size, stride_hh, stride_wv, stride_wh,
                              HAS_BIAS, DOT_FP32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        # Online log-sum-exp: rescale the running sum to the new running max.
        new_max = tl.maximum(run_max, tl.max(logits, 1))
        run_sum = run_sum * tl.exp(run_max - new_max) \
            + tl.sum(tl.exp(logits - new_max[:, None]), 1)
        run_max = new_max
        # Gather: the label's column, if it falls in this tile, adds its logit.
        label_logit += tl.sum(tl.where(offs_v[None, :] == labels[:, None], logits, 0.0), 1)

    # Partial LSE of this split in row `split` of the [splits, n] buffer.
    tl.store(part_lse_ptr + split.to(tl.int64) * n_tokens + offs_n,
             run_max + tl.log(run_sum), mask=mask_n)
    # Exactly one split holds each label: only that one writes its logit.
    mine = mask_n & (labels >= v_begin) & (labels < v_end)
    tl.store(label_logit_ptr + offs_n, label_logit, mask=mine)


@triton.jit
def _linear_logps_bwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, rows_ptr, lse_ptr, coef_ptr,
    dhidden_ptr, dweight_ptr, dbias_ptr,
    n_tokens, vocab_size, hidden_size, filter_eps,
    stride_hn, stride_hh, stride_wv, stride_wh, stride_dhn, stride_dwv,
    HAS_BIAS: tl.constexpr, DH_DIRECT: tl.constexpr, FILTER: tl.constexpr,
    DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # Grouped order (Triton matmul tutorial): GROUP_N consecutive token tiles visit every
    # vocab tile before the next group starts, so a weight tile is reused from L2 GROUP_N
    # times and concurrent atomics land on different dHidden / dWeight rows.
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(n_tokens, BLOCK_N)
    num_v_tiles = tl.cdiv(vocab_size, BLOCK_V)
    programs_per_group = GROUP_N * num_v_tiles
    first_n_tile = (pid // programs_per_group) * GROUP_N
    group_n = tl.minimum(num_n_tiles - first_n_tile, GROUP_N)   # last group may be short
    pid_n = first_n_tile + (pid % programs_per_group) % group_n
    pid_v = (pid % programs_per_group) // group_n

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_tokens
    coef = tl.load(coef_ptr + offs_n, mask=mask_n, other=0.0)
    # A token tile whose coefficients are all zero contributes nothing: skip it entirely.
    if tl.max(tl.abs(coef), 0) > 0:
        rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
        h_row_ptrs = hidden_ptr + rows * stride_hn
        labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1)
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < vocab_size
        logits = _logits_tile(h_row_ptrs, mask_n, weight_ptr, bias_ptr, offs_v, mask_v,
                              hidden_size, stride_hh, stride_wv, stride_wh,
                              HAS_BIAS, DOT_FP32, PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        # d logp / d logits = onehot(label) - softmax, times each token's coefficient.
        # Columns past the vocab have logits -inf, so softmax 0 and no label: g is 0 there.
        onehot = tl.where(offs_v[None, :] == labels[:, None], 1.0, 0.0)
        g = coef[:, None] * (onehot - tl.exp(logits - lse[:, None]))          # [BN, BV]
        keep = True
        if FILTER:
            # Skip when every row's gradient mass in this tile is below eps * |coef|.
            excess = tl.sum(tl.abs(g), 1) - filter_eps * tl.abs(coef)
            keep = tl.max(excess, 0) > 0
        if keep:
            if HAS_BIAS:
                tl.atomic_add(dbias_ptr + offs_v, tl.sum(g, 0), mask=mask_v, sem="relaxed")
            if DOT_FP32:
                gd = g
            else:  # tensor cores: 16-bit operands, fp32 accumulation
                gd = g.to(weight_ptr.dtype.element_ty)
            # dHidden rows: the hidden row itself (DH_DIRECT, fp32 output) or the compacted
            # token index into an [n, H] fp32 buffer.
            if DH_DIRECT:
                dh_row_ptrs = dhidden_ptr + rows * stride_dhn
            else:
                dh_row_ptrs = dhidden_ptr + offs_n.to(tl.int64) * stride_dhn
            dw_row_ptrs = dweight_ptr + offs_v.to(tl.int64) * stride_dwv
            w_row_ptrs = weight_ptr + offs_v.to(tl.int64) * stride_wv
            for h0 in range(0, hidden_size, BLOCK_H):
                offs_h = h0 + tl.arange(0, BLOCK_H)
                mask_h = offs_h < hidden_size
                mask_nh = mask_n[:, None] & mask_h[None, :]
                mask_vh = mask_v[:, None] & mask_h[None, :]
                e = tl.load(h_row_ptrs[:, None] + offs_h[None, :] * stride_hh,
                            mask=mask_nh, other=0.0)                           # [BN, BH]
                w = tl.load(w_row_ptrs[:, None] + offs_h[None, :] * stride_wh,
                            mask=mask_vh, other=0.0)                           # [BV, BH]
                if DOT_FP32:
                    e = e.to(tl.float32)
                    w = w.to(tl.float32)
                dh = tl.dot(gd, w, input_precision=PRECISION)                  # [BN, BH]
                tl.atomic_add(dh_row_ptrs[:, None] + offs_h[None, :], dh, mask=mask_nh,
                              sem="relaxed")
                dw = tl.dot(tl.trans(gd), e, input_precision=PRECISION)        # [BV, BH]
                tl.atomic_add(dw_row_ptrs[:, None] + offs_h[None, :], dw, mask=mask_vh,
                              sem="relaxed")


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------
# GPU: one config per (kernel, dtype); compile-checked for sm_80 and sm_90 (shared memory
# in bytes per block noted as sm_80 / sm_90). 16-bit dtypes feed tl.dot directly (tensor
# cores), fp32 uses exact "ieee" products.
GPU_CONFIGS = {
    "fwd": {
        "bf16": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
        "fp16": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
        "fp32": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, num_warps=8, num_stages=3),
    },
    "bwd": {
        "bf16": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8, num_warps=8,
                     num_stages=3),
        "fp16": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, GROUP_N=8, num_warps=8,
                     num_stages=3),
        "fp32": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, GROUP_N=8, num_warps=8,
                     num_stages=3),
    },
}
# Interpreter: few programs with big blocks (each program costs ~0.6 ms, each loop step
# ~0.13 ms); any dtype.
INTERPRET_CONFIGS = {
    "fwd": dict(BLOCK_N=64, BLOCK_V=8192, BLOCK_H=128, num_warps=4, num_stages=1),
    "bwd": dict(BLOCK_N=64, BLOCK_V=8192, BLOCK_H=128, GROUP_N=1, num_warps=4, num_stages=1),
}


def _config(kernel: str, dtype: torch.dtype) -> dict:
    if _interpreting():
        return dict(INTERPRET_CONFIGS[kernel])
    return dict(GPU_CONFIGS[kernel][_TL_DTYPE[dtype]])


def _dot_flags(dtype: torch.dtype) -> dict:
    """fp32 operands (fp32 inputs, or any input under the interpreter) use exact products."""
    dot_fp32 = dtype == torch.float32 or _interpreting()
    return {"DOT_FP32": dot_fp32, "PRECISION": "ieee" if dot_fp32 else "tf32"}


def _num_programs_wanted(device: torch.device) -> int:
    if _interpreting() or device.type != "cuda":
        return 1
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _check(hidden, weight, bias, labels, rows):
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in _TL_DTYPE:
        raise ValueError(f"hidden and weight must share one of fp32/bf16/fp16, got "
                         f"{hidden.dtype} and {weight.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if labels.shape != rows.shape or labels.ndim != 1:
        raise ValueError(f"labels and rows must both be [n], got {tuple(labels.shape)} and "
                         f"{tuple(rows.shape)}")


# ----------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------
def linear_token_logps_forward(hidden, weight, bias, labels, rows):
    """Label log-prob and log-sum-exp of the tokens hidden[rows] under the LM head.

    hidden [N, H] and weight [V, H] (fp32, bf16 or fp16, same dtype, any strides); bias [V]
    or None; labels [n] int64 in [0, V); rows [n] int64 indices into hidden (the completion
    tokens). Returns (token_logps [n] fp32, lse [n] fp32). Memory: O(n * splits) floats.
    """
    _check(hidden, weight, bias, labels, rows)
    num_tokens, (vocab_size, hidden_size) = rows.shape[0], weight.shape
    token_logps = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
    if num_tokens == 0:
        return token_logps, torch.empty_like(token_logps)
    cfg = _config("fwd", hidden.dtype)
    block_n, block_v = cfg["BLOCK_N"], cfg["BLOCK_V"]
    n_tiles, v_tiles = triton.cdiv(num_tokens, block_n), triton.cdiv(vocab_size, block_v)
    # Split the vocab only as much as needed to give every SM work (when n is small).
    splits = min(v_tiles, max(1, triton.cdiv(_num_programs_wanted(hidden.device), n_tiles)))
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)        # no empty split
    part_lse = torch.empty(splits, num_tokens, dtype=torch.float32, device=hidden.device)
    label_logit = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
    rows, labels = rows.contiguous(), labels.contiguous()
    _linear_logps_fwd_kernel[(n_tiles, splits)](
        hidden, weight, weight if bias is None else bias, labels, rows,
        part_lse, label_logit,
        num_tokens, vocab_size, hidden_size, tiles_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None, **_dot_flags(hidden.dtype), **cfg)
    lse = part_lse[0] if splits == 1 else torch.logsumexp(part_lse, dim=0)
    torch.sub(label_logit, lse, out=token_logps)
    return token_logps, lse


def linear_token_logps_backward(hidden, weight, bias, labels, rows, lse, grad_token,
                                filter_eps=None):
    """Gradients of sum(grad_token * token_logps) w.r.t. hidden, weight and bias.

    Same inputs as the forward plus its lse [n] fp32 and grad_token [n] fp32. Returns
    (dhidden [N, H], zero on rows not listed; dweight [V, H]; dbias [V] or None) in the input
    dtypes, accumulated in fp32 (fp32 inputs accumulate in the outputs themselves; 16-bit
    ones in an [n, H] and a [V, H] fp32 buffer, then cast). `filter_eps` overrides the
    tile-skipping threshold (`FILTER_EPS[dtype]`; 0 disables skipping).
    """
    _check(hidden, weight, bias, labels, rows)
    num_tokens, (vocab_size, hidden_size) = rows.shape[0], weight.shape
    dtype, device = hidden.dtype, hidden.device
    fp32 = dtype == torch.float32
    dhidden = torch.zeros_like(hidden, memory_format=torch.contiguous_format)
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=device)
    dbias = None if bias is None else torch.zeros(vocab_size, dtype=torch.float32,
                                                  device=device)
    if num_tokens:
        # fp32: atomics straight into dhidden rows; 16-bit: a compact fp32 [n, H] buffer.
        dh_acc = dhidden if fp32 else torch.zeros(num_tokens, hidden_size,
                                                  dtype=torch.float32, device=device)
        eps = FILTER_EPS[dtype] if filter_eps is None else float(filter_eps)
        cfg = _config("bwd", dtype)
        grid = (triton.cdiv(num_tokens, cfg["BLOCK_N"]) * triton.cdiv(vocab_size,
                                                                      cfg["BLOCK_V"]),)
        _linear_logps_bwd_kernel[grid](
            hidden, weight, weight if bias is None else bias, labels.contiguous(),
            rows.contiguous(), lse.contiguous(), grad_token.float().contiguous(),
            dh_acc, dweight, dweight if dbias is None else dbias,
            num_tokens, vocab_size, hidden_size, eps,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            dh_acc.stride(0), dweight.stride(0),
            HAS_BIAS=bias is not None, DH_DIRECT=fp32, FILTER=eps > 0,
            **_dot_flags(dtype), **cfg)
        if not fp32:
            dhidden[rows] = dh_acc.to(dtype)
    return (dhidden, dweight.to(weight.dtype),
            None if dbias is None else dbias.to(bias.dtype))
