"""Logit-free token log-probs under an LM head: hidden [N, H] x weight [V, H]^T, never [N, V].

Twin: `mixpo.kernels.linear_logps_torch` (same functions, inputs and outputs).
Cut-Cross-Entropy-style tiling: a program multiplies a tile of tokens by a tile of vocab rows
of the weight in SRAM (tl.dot over BLOCK_H chunks of H, fp32 accumulation); only per-token
values leave the forward (log-sum-exp, label logit), and the backward recomputes each
[BLOCK_N, BLOCK_V] logits tile instead of storing anything of size N x V.

Forward (`_linear_lse_fwd_kernel`), grid (token tiles, vocab splits): each program runs an
    online log-sum-exp over the vocab tiles of its split and writes one partial LSE per token
    into a [splits, n] buffer, combined on the host. Splits exist only to give every SM work
    when n is small. The label's logit is a dot product hidden[row] . weight[label], computed
    by the split-0 programs, so the tile loop carries no label gather.
Backward, d logp / d logits = onehot(label) - softmax, times each token's coefficient, in two
    parts whose sum is the gradient:
    - `_linear_softmax_bwd_kernel`, grid (token tiles x vocab tiles) in grouped order: the
      dense part -coef * softmax of a recomputed tile, scattered as dHidden += G @ W_tile and
      dWeight_tile += G^T @ E with fp32 atomics. Tiles whose softmax mass is negligible for
      every token skip both products (`filter_eps`), and token tiles whose coefficients are all
      zero (e.g. the rejected responses of MixDPO's hard pairs) skip everything.
    - `_linear_label_bwd_kernel`, grid (token tiles, H tiles): the sparse one-hot part,
      dHidden[row] += coef * weight[label] and dWeight[label] += coef * hidden[row].
    With 16-bit weights both run once per vocab chunk (`DWEIGHT_CHUNK_BYTES` of fp32
    dWeight accumulator, rounded into the 16-bit gradient when the chunk is done), so the
    backward never holds an fp32 [V, H] copy; tokens whose label lies in another chunk get a
    zero coefficient there and move no memory.

Hidden rows are read through the `rows` index array (prompt and padding rows are never copied
or multiplied). Offsets into hidden, weight and the gradient buffers are int64 (n * H, V * H
and N * V pass 2^31 at LLM sizes). Loads are cast to fp32 at once; tl.dot gets 16-bit operands
on GPUs (tensor cores, fp32 accumulation) and fp32 ones under the interpreter (whose 16-bit
dot is wrong) or for fp32 inputs ("tf32x3": three tf32 products, about fp32 accuracy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixpo.kernels.configs import DTYPE_TAGS, DWEIGHT_CHUNK_BYTES, choose
from mixpo.kernels.dispatch import INTERPRET
from mixpo.kernels.logits_logps import STAT_NAMES, transform_logits, transform_slope

# Backward tile skipping: a [BLOCK_N, BLOCK_V] tile skips its dHidden / dWeight products when
# every token with a nonzero coefficient has softmax mass <= eps inside the tile. The mass
# dropped for one token over the whole vocab is then at most (V / BLOCK_V) * eps, so the
# gradient error is below coef * that * max|W| (or max|hidden|): < 2^-19 coef at V = 256k
# for fp32 and < 2^-9 coef (under bf16 rounding) for 16-bit dtypes. An untrained head has a
# flat softmax and skips nothing; a trained LM's peaked softmax skips most tiles.
FILTER_EPS = {torch.float32: 2.0**-30, torch.bfloat16: 2.0**-20, torch.float16: 2.0**-20}


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(h_rows, mask_n, weight_ptr, bias_ptr, has_bias, offs_v, mask_v, hidden_size,
                 stride_wv, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Raw fp32 logits [BLOCK_N, BLOCK_V] of the hidden rows starting at pointers `h_rows`
    [BN] against weight rows `offs_v` [BV] (0 in columns outside `mask_v`: callers mask them
    after the logit transform)."""
    # Pointer to the start of each weight row of the tile (int64: V * H may pass 2^31).
    w_rows = weight_ptr + offs_v.to(tl.int64) * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, hidden_size, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < hidden_size
        e = tl.load(h_rows[:, None] + offs_h[None, :],
                    mask=mask_n[:, None] & mask_h[None, :], other=0.0)             # [BN, BH]
        w = tl.load(w_rows[:, None] + offs_h[None, :],
                    mask=mask_v[:, None] & mask_h[None, :], other=0.0)             # [BV, BH]
        if UPCAST or (e.dtype == tl.float32):
            acc = tl.dot(e.to(tl.float32), tl.trans(w.to(tl.float32)), acc,
                         input_precision="tf32x3")
        else:  # tensor cores: 16-bit operands, fp32 accumulator
            acc = tl.dot(e, tl.trans(w), acc)
    if has_bias:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0)[None, :]
    return acc


@triton.jit
def _linear_lse_fwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, rows_ptr, part_lse_ptr, label_logit_ptr,
    part_stats_ptr, n_tokens, vocab_size, hidden_size, tiles_per_split, stride_hn, stride_wv,
    has_bias, logit_scale, softcap,
    UPCAST: tl.constexpr, SOFTCAP: tl.constexpr, STATS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_tokens
    # Compacted token i is hidden row rows[i]: pointer to the start of that row (int64).
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    h_rows = hidden_ptr + rows * stride_hn

    # This split covers the vocab range [v_begin, v_end): `tiles_per_split` whole tiles, the
    # last split stopping at the vocab size.
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, vocab_size)
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # STATS: sum exp(z' - max) z', sum exp(2 (z' - max)), sum z', first argmax.
    run_ez = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_arg = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        raw = _logits_tile(h_rows, mask_n, weight_ptr, bias_ptr, has_bias, offs_v, mask_v,
                           hidden_size, stride_wv, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)
        logits, _ = transform_logits(raw, logit_scale, softcap, SOFTCAP)
        logits = tl.where(mask_v[None, :], logits, float("-inf"))
        # Online log-sum-exp: rescale the running sum to the new running max.
        tile_max, tile_arg = tl.max(logits, 1, return_indices=True,
                                    return_indices_tie_break_left=True)
        new_max = tl.maximum(run_max, tile_max)
        rescale = tl.exp(run_max - new_max)
        exp_tile = tl.exp(logits - new_max[:, None])
        run_sum = run_sum * rescale + tl.sum(exp_tile, 1)
        if STATS:
            finite = tl.where(mask_v[None, :], logits, 0.0)
            run_ez = run_ez * rescale + tl.sum(exp_tile * finite, 1)
            run_sq = run_sq * rescale * rescale + tl.sum(exp_tile * exp_tile, 1)
            run_z += tl.sum(finite, 1)
            # Strictly greater: an earlier tile keeps a tie (the first argmax wins).
            run_arg = tl.where(tile_max > run_max, v0 + tile_arg, run_arg)
        run_max = new_max
    # Row `split` of the [splits, n] partial-LSE buffer.
    part = split.to(tl.int64) * n_tokens + offs_n
    tl.store(part_lse_ptr + part, run_max + tl.log(run_sum), mask=mask_n)
    if STATS:
        # part_stats [5, splits, n]: E[z'] under the split's softmax, log sum exp(2 z'),
        # sum z', first argmax, max.
        plane = tl.num_programs(1).to(tl.int64) * n_tokens
        tl.store(part_stats_ptr + part, run_ez / run_sum, mask=mask_n)
        tl.store(part_stats_ptr + plane + part, 2.0 * run_max + tl.log(run_sq), mask=mask_n)
        tl.store(part_stats_ptr + 2 * plane + part, run_z, mask=mask_n)
        tl.store(part_stats_ptr + 3 * plane + part, run_arg.to(tl.float32), mask=mask_n)
        tl.store(part_stats_ptr + 4 * plane + part, run_max, mask=mask_n)

    if split == 0:
        # The label's raw logit: hidden[row] . weight[label] (+ bias[label]), in fp32; the
        # launch helper applies the transform.
        labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
        w_rows = weight_ptr + labels * stride_wv
        label_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for h0 in range(0, hidden_size, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            mask = mask_n[:, None] & (offs_h < hidden_size)[None, :]
            e = tl.load(h_rows[:, None] + offs_h[None, :], mask=mask, other=0.0)
            w = tl.load(w_rows[:, None] + offs_h[None, :], mask=mask, other=0.0)
            label_logit += tl.sum(e.to(tl.float32) * w.to(tl.float32), 1)
        if has_bias:
            label_logit += tl.load(bias_ptr + labels, mask=mask_n, other=0.0)
        tl.store(label_logit_ptr + offs_n, label_logit, mask=mask_n)


@triton.jit
def _linear_softmax_bwd_kernel(
    hidden_ptr, weight_ptr, bias_ptr, rows_ptr, lse_ptr, coef_ptr,
    dhidden_ptr, dweight_ptr, dbias_ptr,
    n_tokens, vocab_size, hidden_size, filter_eps, stride_hn, stride_wv, stride_dhn,
    stride_dwv, has_bias, dh_direct, weight_grad, logit_scale, softcap,
    UPCAST: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    # Grouped order (Triton matmul tutorial): GROUP_N consecutive token tiles visit every
    # vocab tile before the next group starts, so a weight tile is reused from L2 GROUP_N
    # times and concurrent atomics land on different dHidden / dWeight rows.
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(n_tokens, BLOCK_N)
    programs_per_group = GROUP_N * tl.cdiv(vocab_size, BLOCK_V)
    first_n_tile = (pid // programs_per_group) * GROUP_N
    group_n = tl.minimum(num_n_tiles - first_n_tile, GROUP_N)   # the last group may be short
    pid_n = first_n_tile + (pid % programs_per_group) % group_n
    pid_v = (pid % programs_per_group) // group_n

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_tokens
    coef = tl.load(coef_ptr + offs_n, mask=mask_n, other=0.0)
    # A token tile whose coefficients are all zero contributes nothing.
    if tl.max(tl.abs(coef), 0) > 0:
        rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
        h_rows = hidden_ptr + rows * stride_hn
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        mask_v = offs_v < vocab_size
        raw = _logits_tile(h_rows, mask_n, weight_ptr, bias_ptr, has_bias, offs_v, mask_v,
                           hidden_size, stride_wv, UPCAST, BLOCK_N, BLOCK_V, BLOCK_H)
        logits, tanh = transform_logits(raw, logit_scale, softcap, SOFTCAP)
        probs = tl.where(mask_v[None, :], tl.exp(logits - lse[:, None]), 0.0)  # softmax
        # Softmax mass of the tile for each token that has a gradient; skip if all negligible.
        mass = tl.where(coef != 0.0, tl.sum(probs, 1), 0.0)
        if tl.max(mass, 0) > filter_eps:
            # d logp / d raw logit, dense part: -coef * softmax * dz'/dz.     [BN, BV]
            g = -coef[:, None] * probs * transform_slope(tanh, logit_scale, SOFTCAP)
            if has_bias:
                tl.atomic_add(dbias_ptr + offs_v, tl.sum(g, 0), mask=mask_v, sem="relaxed")
            if UPCAST or (hidden_ptr.dtype.element_ty == tl.float32):
                gd = g
            else:  # tensor cores: 16-bit operands, fp32 accumulators
                gd = g.to(hidden_ptr.dtype.element_ty)
            # dHidden row of each token: its hidden row (fp32 outputs, written in place) or
            # its compacted index (an [n, H] fp32 buffer for 16-bit outputs).
            dh_rows = dhidden_ptr + tl.where(dh_direct != 0, rows, offs_n.to(tl.int64)) \
                * stride_dhn
            dw_rows = dweight_ptr + offs_v.to(tl.int64) * stride_dwv
            w_rows = weight_ptr + offs_v.to(tl.int64) * stride_wv
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


@triton.jit
def _linear_label_bwd_kernel(
    hidden_ptr, weight_ptr, labels_ptr, rows_ptr, coef_ptr, dhidden_ptr, dweight_ptr,
    dbias_ptr, n_tokens, hidden_size, stride_hn, stride_wv, stride_dhn, stride_dwv,
    has_bias, dh_direct, weight_grad, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_tokens
    coef = tl.load(coef_ptr + offs_n, mask=mask_n, other=0.0)
    rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    # Tokens with a zero coefficient (labels outside this vocab chunk, routed rejected
    # responses) move no memory.
    active_n = mask_n & (coef != 0.0)
    mask = active_n[:, None] & (offs_h < hidden_size)[None, :]
    # The one-hot part of the gradient touches one weight row per token: weight[label].
    e = tl.load(hidden_ptr + rows[:, None] * stride_hn + offs_h[None, :], mask=mask,
                other=0.0).to(tl.float32)
    w = tl.load(weight_ptr + labels[:, None] * stride_wv + offs_h[None, :], mask=mask,
                other=0.0).to(tl.float32)
    dh_rows = tl.where(dh_direct != 0, rows, offs_n.to(tl.int64)) * stride_dhn
    tl.atomic_add(dhidden_ptr + dh_rows[:, None] + offs_h[None, :], coef[:, None] * w,
                  mask=mask, sem="relaxed")
    # Atomics: several tokens may share a label.
    if weight_grad:
        tl.atomic_add(dweight_ptr + labels[:, None] * stride_dwv + offs_h[None, :],
                      coef[:, None] * e, mask=mask, sem="relaxed")
    if has_bias:
        if pid_h == 0:
            tl.atomic_add(dbias_ptr + labels, coef, mask=active_n, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------
def _spec_name(kernel: str, dtype: torch.dtype) -> str:
    """configs.py registers 16-bit and fp32 variants of the tiled kernels separately."""
    return f"{kernel}_fp32" if dtype == torch.float32 else kernel


def _unit_stride(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels need H contiguous (unit stride); other strides are free."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _programs_wanted(device: torch.device) -> int:
    """Programs that keep a GPU busy (two per SM); 1 under the interpreter."""
    if INTERPRET or device.type != "cuda":
        return 1
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _check(hidden, weight, bias, labels, rows):
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in DTYPE_TAGS:
        raise ValueError(f"hidden and weight must share one of fp32/bf16/fp16, got "
                         f"{hidden.dtype} and {weight.dtype}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if labels.ndim != 1 or labels.shape != rows.shape:
        raise ValueError(f"labels and rows must both be [n], got {tuple(labels.shape)} and "
                         f"{tuple(rows.shape)}")


def label_transform(label_logit: torch.Tensor, logit_scale: float, softcap):
    """(z', dz'/dz) of the labels' raw fp32 logits [n] (the one-hot part of the gradient)."""
    if softcap:
        tanh = torch.tanh(label_logit * (logit_scale / softcap))
        return softcap * tanh, logit_scale * (1.0 - tanh * tanh)
    return logit_scale * label_logit, torch.full_like(label_logit, logit_scale)


def _combine_stats(part_lse, lse, part_stats, labels, vocab_size) -> dict:
    """STAT_NAMES -> [n] fp32 from the vocab splits' partial statistics [5, splits, n]."""
    expected, log_sq, sum_z, argmax, split_max = part_stats
    weights = torch.exp(part_lse - lse)                    # each split's share of the mass
    best = split_max.argmax(0, keepdim=True)               # the first split holding the max
    return {"mean_logit": sum_z.sum(0) / vocab_size,
            "entropy": lse - (weights * expected).sum(0),
            "log_sum_sq": torch.logsumexp(log_sq, 0) - 2.0 * lse,
            "top1": (argmax.gather(0, best).squeeze(0).long() == labels).float()}


def linear_token_logps_forward(hidden, weight, bias, labels, rows, logit_scale: float = 1.0,
                               softcap=None, stats: bool = False):
    """Label log-prob and log-sum-exp of the tokens hidden[rows] under the LM head and the
    logit transform (module docstring of mixpo.kernels.logits_logps).

    hidden [N, H] and weight [V, H]: fp32, bf16 or fp16, same dtype, unit stride along H
    (copied otherwise); bias [V] (any float dtype) or None; labels [n] int64 in [0, V);
    rows [n] int64 indices into hidden (the completion tokens).
    Returns (token_logps [n] fp32, lse [n] fp32, aux): aux["label_logit"] [n] fp32 is the
    labels' raw logit (the backward needs it), and with `stats=True` aux holds STAT_NAMES ->
    [n] fp32 too. Extra memory: [splits, n] fp32 (x6 with stats).
    """
    _check(hidden, weight, bias, labels, rows)
    hidden, weight = _unit_stride(hidden), _unit_stride(weight)
    num_tokens, (vocab_size, hidden_size) = rows.shape[0], weight.shape
    device = hidden.device
    if num_tokens == 0:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        aux = {"label_logit": empty.clone()}
        if stats:
            aux.update({name: empty.clone() for name in STAT_NAMES})
        return empty, empty.clone(), aux
    launch = choose(_spec_name("linear_lse_fwd", hidden.dtype), dtype=hidden.dtype,
                    num_tokens=num_tokens)
    block_n, block_v = launch.block("BLOCK_N"), launch.block("BLOCK_V")
    n_tiles, v_tiles = triton.cdiv(num_tokens, block_n), triton.cdiv(vocab_size, block_v)
    # Split the vocab only as far as needed to give every SM work (small n).
    splits = min(v_tiles, max(1, triton.cdiv(_programs_wanted(device), n_tiles)))
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)                # no empty split
    part_lse = torch.empty(splits, num_tokens, dtype=torch.float32, device=device)
    label_logit = torch.empty(num_tokens, dtype=torch.float32, device=device)
    part_stats = torch.empty((5, splits, num_tokens) if stats else (1,), dtype=torch.float32,
                             device=device)
    bias32 = label_logit if bias is None else bias.float().contiguous()   # dummy when unused
    _linear_lse_fwd_kernel[(n_tiles, splits)](
        hidden, weight, bias32, labels.contiguous(), rows.contiguous(), part_lse, label_logit,
        part_stats, num_tokens, vocab_size, hidden_size, tiles_per_split, hidden.stride(0),
        weight.stride(0), int(bias is not None), float(logit_scale), float(softcap or 0.0),
        UPCAST=INTERPRET, SOFTCAP=bool(softcap), STATS=stats, **launch.launch_kwargs())
    lse = part_lse[0] if splits == 1 else torch.logsumexp(part_lse, dim=0)
    label_value, _ = label_transform(label_logit, logit_scale, softcap)
    aux = {"label_logit": label_logit}
    if stats:
        aux.update(_combine_stats(part_lse, lse, part_stats, labels, vocab_size))
    return label_value - lse, lse, aux


def _vocab_chunk_rows(vocab_size: int, hidden_size: int, block_v: int, vocab_chunk) -> int:
    rows = vocab_chunk or DWEIGHT_CHUNK_BYTES // (4 * hidden_size)
    return min(vocab_size, max(block_v, rows // block_v * block_v))


def linear_token_logps_backward(hidden, weight, bias, labels, rows, lse, grad_token,
                                label_logit, logit_scale: float = 1.0, softcap=None,
                                filter_eps=None, vocab_chunk=None, weight_grad: bool = True):
    """Gradients of sum(grad_token * token_logps) w.r.t. hidden, weight and bias.

    Same inputs as the forward plus its lse [n] fp32, grad_token [n] fp32 and the labels' raw
    logits aux["label_logit"] [n]. Returns (dhidden [N, H] contiguous, zero on rows not
    listed; dweight [V, H]; dbias [V] or None) in the input dtypes, accumulated in fp32: fp32
    dhidden in place, otherwise in an [n, H] fp32 buffer; fp32 dweight in place; 16-bit
    dweight through an fp32 buffer of `vocab_chunk` rows (default: DWEIGHT_CHUNK_BYTES' worth,
    a multiple of the vocab tile), the vocab processed chunk by chunk. `filter_eps` overrides
    the tile-skipping threshold `FILTER_EPS[dtype]` (0: skip only tiles whose softmax
    underflows to exactly 0). `weight_grad=False` (a frozen head): dweight is None, and
    neither its products nor its buffers exist.
    """
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
    if num_tokens:
        rows, labels = rows.contiguous(), labels.contiguous()
        coef = grad_token.float().contiguous()
        # fp32: atomics straight into dhidden's rows; 16-bit: into a compact fp32 buffer.
        dh_acc = dhidden if direct else torch.zeros(num_tokens, hidden_size,
                                                    dtype=torch.float32, device=device)
        bias32 = coef if bias is None else bias.float().contiguous()      # dummy when unused
        eps = FILTER_EPS[dtype] if filter_eps is None else float(filter_eps)
        dense = choose(_spec_name("linear_softmax_bwd", dtype), dtype=dtype,
                       num_tokens=num_tokens)
        label = choose("linear_label_bwd", num_tokens=num_tokens)
        # The one-hot part at the label: coef * dz'/dz there.
        _, label_slope = label_transform(label_logit.float(), logit_scale, softcap)
        label_coef = (coef * label_slope).contiguous()
        chunk_rows = vocab_size if direct or not weight_grad else _vocab_chunk_rows(
            vocab_size, hidden_size, dense.block("BLOCK_V"), vocab_chunk)
        dw_acc = None if not weight_grad else dweight if direct else torch.empty(
            chunk_rows, hidden_size, dtype=torch.float32, device=device)
        lse = lse.contiguous()
        label_grid = (triton.cdiv(num_tokens, label.block("BLOCK_N")),
                      triton.cdiv(hidden_size, label.block("BLOCK_H")))
        for v0 in range(0, vocab_size, chunk_rows):
            v1 = min(v0 + chunk_rows, vocab_size)
            # Views of this chunk's vocab rows: the kernels see a vocab of v1 - v0 entries
            # (the softmax still normalises by the full lse).
            # Without weight_grad, dhidden's buffer stands in as a pointer never written.
            dw_chunk = dh_acc if dw_acc is None else dw_acc[:v1 - v0]
            if not direct and weight_grad:
                dw_chunk.zero_()
            bias_chunk = bias32[v0:v1] if bias is not None else bias32
            dbias_chunk = dbias[v0:v1] if dbias is not None else coef
            grid = (triton.cdiv(num_tokens, dense.block("BLOCK_N"))
                    * triton.cdiv(v1 - v0, dense.block("BLOCK_V")),)
            _linear_softmax_bwd_kernel[grid](
                hidden, weight[v0:v1], bias_chunk, rows, lse, coef, dh_acc,
                dw_chunk, dbias_chunk, num_tokens, v1 - v0, hidden_size, eps,
                hidden.stride(0), weight.stride(0), dh_acc.stride(0), dw_chunk.stride(0),
                int(bias is not None), int(direct), int(weight_grad), float(logit_scale),
                float(softcap or 0.0),
                UPCAST=INTERPRET, SOFTCAP=bool(softcap), **dense.launch_kwargs())
            # Labels outside the chunk get a zero coefficient (and a harmless in-chunk index).
            if chunk_rows >= vocab_size:
                chunk_labels, chunk_coef = labels, label_coef
            else:
                inside = (labels >= v0) & (labels < v1)
                chunk_labels = torch.where(inside, labels - v0, 0).contiguous()
                chunk_coef = torch.where(inside, label_coef, 0.0).contiguous()
            _linear_label_bwd_kernel[label_grid](
                hidden, weight[v0:v1], chunk_labels, rows, chunk_coef, dh_acc, dw_chunk,
                dbias_chunk, num_tokens, hidden_size, hidden.stride(0), weight.stride(0),
                dh_acc.stride(0), dw_chunk.stride(0), int(bias is not None), int(direct),
                int(weight_grad), **label.launch_kwargs())
            if not direct and weight_grad:
                dweight[v0:v1] = dw_chunk
        if not direct:
            dhidden[rows] = dh_acc.to(dtype)
    return (dhidden, None if dweight is None else dweight.to(weight.dtype),
            None if dbias is None else dbias.to(bias.dtype))
