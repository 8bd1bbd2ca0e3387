"""Logit-free token log-probs under an LM head: hidden [N, H] x weight [V, H]^T, never [N, V].

Twin: `mixpo.kernels.linear_logps_torch` (same functions, inputs and outputs).
Only per-token values leave the forward (log-sum-exp, label logit); the backward recomputes
the logits one vocab chunk at a time, so nothing of size N x V is ever stored.

Forward (`_linear_lse_fwd_kernel`), grid (vocab splits, token tiles): each program multiplies
    a tile of tokens by tiles of weight rows in SRAM (tl.dot over BLOCK_H chunks of H, fp32
    accumulation) with an online log-sum-exp over the vocab tiles of its split, and writes one
    partial LSE per token into a [splits, n] buffer, combined on the host. The split count
    comes from the compiled kernel's real occupancy (registers, shared memory), the SM count
    and the L2 size: enough splits that the resident programs' hidden tiles stay in L2
    (`l2_min_splits`), and whole waves (`vocab_splits`). The label's logit is a dot product
    hidden[row] . weight[label] in the split-0 programs.
Backward (default, `method="gemm"`), per vocab chunk [v0, v1) sized to the workspace budget:
    `_linear_softmax_grad_kernel` recomputes each [BLOCK_N, BLOCK_V] logits tile once and
    writes its gradient G = coef * (onehot(label) - softmax) * dz'/dz, in the input dtype
    (16-bit for 16-bit inputs), into the workspace [n, v1 - v0]: every element has one writer.
    Then two cuBLAS GEMMs with fp32 accumulation: dHidden (fp32 [n, H]) += G @ W[v0:v1] and
    dWeight[v0:v1] = G^T @ hidden[rows], each dWeight row written once. No atomics, no fp32
    [V, H] copy, bitwise-reproducible gradients; FLOPs: recompute 2nVH in Triton, 4nVH in
    cuBLAS. Token tiles whose coefficients are all zero (the rejected responses of MixDPO's
    hard pairs) store zeros without the product.
Backward, `method="atomic"`: the older single tile kernel with fp32 atomics
    (`mixpo.kernels.linear_logps_atomic`), kept as a measured alternative with CCE's gradient
    filter.
One pass (`mixpo.kernels.linear_one_pass`, used when the loss allows it): torch GEMMs on
    both backends, the elementwise steps here (`TritonGroupOps`).

Hidden rows are read through the `rows` index array (prompt and padding rows are never copied
or multiplied). Offsets into hidden, weight and the workspace are int64 (n * H, V * H and
n * C pass 2^31 at LLM sizes). Loads are cast to fp32 at once; tl.dot gets 16-bit operands
on GPUs (tensor cores, fp32 accumulation) and fp32 ones under the interpreter (whose 16-bit
dot is wrong) or for fp32 inputs ("tf32x3": three tf32 products, about fp32 accuracy).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixpo.kernels import linear_logps_torch as twin
from mixpo.kernels import logits_logps
from mixpo.kernels.configs import DTYPE_TAGS, choose
from mixpo.kernels.dispatch import INTERPRET
from mixpo.kernels.linear_one_pass import BlockGrad
from mixpo.kernels.logits_logps import STAT_NAMES, transform_logits, transform_slope

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
    # Splits vary fastest in launch order: the programs resident at once share few token
    # tiles, whose hidden rows then stay in L2 while the weight streams past them.
    split = tl.program_id(0)
    pid_n = tl.program_id(1)
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
        plane = tl.num_programs(0).to(tl.int64) * n_tokens
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
def _grouped_tile(n_tokens, vocab_size, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                  GROUP_N: tl.constexpr):
    """(token tile, vocab tile) of this program in grouped order (Triton's matmul tutorial):
    GROUP_N consecutive token tiles visit every vocab tile before the next group starts, so a
    weight tile is reused from L2 GROUP_N times."""
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(n_tokens, BLOCK_N)
    programs_per_group = GROUP_N * tl.cdiv(vocab_size, BLOCK_V)
    first_n_tile = (pid // programs_per_group) * GROUP_N
    group_n = tl.minimum(num_n_tiles - first_n_tile, GROUP_N)   # the last group may be short
    return first_n_tile + (pid % programs_per_group) % group_n, \
        (pid % programs_per_group) // group_n


@triton.jit
def _linear_softmax_grad_kernel(
    hidden_ptr, weight_ptr, bias_ptr, labels_ptr, rows_ptr, lse_ptr, coef_ptr, grad_ptr,
    n_tokens, vocab_size, hidden_size, vocab_start, stride_hn, stride_wv, stride_gn, has_bias,
    logit_scale, softcap,
    UPCAST: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    """G[t, v] = coef[t] * (onehot(label[t]) - softmax[t, v]) * dz'/dz for the vocab chunk at
    `weight_ptr` (rows vocab_start + [0, vocab_size)), written once into the workspace
    `grad_ptr` [n, vocab_size] (row stride stride_gn) in its dtype. No atomics: every
    element of the workspace has exactly one writer."""
    pid_n, pid_v = _grouped_tile(n_tokens, vocab_size, BLOCK_N, BLOCK_V, GROUP_N)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_tokens
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < vocab_size
    grad_ptrs = grad_ptr + offs_n.to(tl.int64)[:, None] * stride_gn + offs_v[None, :]
    mask = mask_n[:, None] & mask_v[None, :]
    coef = tl.load(coef_ptr + offs_n, mask=mask_n, other=0.0)
    # Token tiles whose coefficients are all zero (the rejected responses of MixDPO's hard
    # pairs) store zeros without the product.
    if tl.max(tl.abs(coef), 0) > 0:
        rows = tl.load(rows_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
        lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
        labels = tl.load(labels_ptr + offs_n, mask=mask_n, other=-1) - vocab_start
        raw = _logits_tile(hidden_ptr + rows * stride_hn, mask_n, weight_ptr, bias_ptr,
                           has_bias, offs_v, mask_v, hidden_size, stride_wv, UPCAST, BLOCK_N,
                           BLOCK_V, BLOCK_H)
        logits, tanh = transform_logits(raw, logit_scale, softcap, SOFTCAP)
        onehot = (labels[:, None] == offs_v[None, :]).to(tl.float32)
        grad = coef[:, None] * (onehot - tl.exp(logits - lse[:, None])) \
            * transform_slope(tanh, logit_scale, SOFTCAP)
        tl.store(grad_ptrs, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(grad_ptrs, tl.zeros((BLOCK_N, BLOCK_V), dtype=grad_ptr.dtype.element_ty),
                 mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------
def _spec_name(kernel: str, dtype: torch.dtype) -> str:
    """configs.py registers 16-bit and fp32 variants of the tiled kernels separately."""
    return f"{kernel}_fp32" if dtype == torch.float32 else kernel


def _unit_stride(tensor: torch.Tensor) -> torch.Tensor:
    """The kernels need H contiguous (unit stride); other strides are free."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def occupancy(compiled, device) -> int:
    """Resident CTAs per SM of a compiled kernel: the least of what its registers (allocated
    per warp in units of 256), shared memory (plus 1 KiB reserved per CTA) and threads allow."""
    props = torch.cuda.get_device_properties(device)
    warps = compiled.metadata.num_warps
    regs_per_warp = -(-compiled.n_regs * 32 // 256) * 256
    limits = [getattr(props, "regs_per_multiprocessor", 65536) // max(1, regs_per_warp * warps),
              getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)]
    shared = compiled.metadata.shared
    if shared:
        limits.append(getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
                      // (shared + 1024))
    return max(1, min(limits))


_SLOTS: dict = {}


def _forward_slots(device: torch.device, key, compile_kernel) -> int:
    """CTAs of the forward kernel the GPU runs at once: SMs x the compiled kernel's occupancy
    (`compile_kernel()` returns it compiled, not launched; measured once per configuration);
    1 under the interpreter."""
    if INTERPRET or device.type != "cuda":
        return 1
    key = (device.index, key)
    if key not in _SLOTS:
        try:
            compiled = compile_kernel()
            compiled._init_handles()        # loads the binary: n_regs
            per_sm = occupancy(compiled, device)
        except (AttributeError, RuntimeError, TypeError):   # another Triton's object layout
            per_sm = 1
        _SLOTS[key] = per_sm * torch.cuda.get_device_properties(device).multi_processor_count
    return _SLOTS[key]


def vocab_splits(n_tiles: int, v_tiles: int, slots: int, min_splits: int = 1) -> int:
    """Vocab splits of the forward grid (splits x n_tiles programs, `slots` resident at once):
    the fewest from `min_splits` on whose waves are at least 90 % full, else the fullest
    (each split costs one partial log-sum-exp per token). 12,288 tokens in 128-token tiles on
    132 SMs at one CTA each, no L2 bound: 4 splits, 384 programs in 3 waves (97 %), where
    3 splits left the last wave a quarter empty (73 %)."""
    best, best_fill = 1, -1.0
    for splits in range(max(1, min(min_splits, v_tiles)), min(v_tiles, 2 * slots) + 1):
        splits = -(-v_tiles // -(-v_tiles // splits))          # no empty split
        programs = n_tiles * splits
        fill = programs / (-(-programs // slots) * slots)
        if fill >= 0.9:
            return splits
        if fill > best_fill + 1e-9:
            best, best_fill = splits, fill
    return best


def l2_min_splits(slots: int, tile_bytes: int, l2_bytes: int) -> int:
    """Splits that keep the hidden tiles of the resident programs (slots / splits token tiles
    of `tile_bytes` each) within half of L2: otherwise every vocab step re-reads them from
    HBM (at Llama-3 shape on an H100: 132 x 2 MiB tiles, 101 GB of re-reads in place of 0.1)."""
    return max(1, -(-slots * tile_bytes // max(1, l2_bytes // 2)))


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
                               softcap=None, stats: bool = False, workspace_bytes=None,
                               workspace=None):
    """Label log-prob and log-sum-exp of the tokens hidden[rows] under the LM head and the
    logit transform (module docstring of mixpo.kernels.logits_logps).

    hidden [N, H] and weight [V, H]: fp32, bf16 or fp16, same dtype, unit stride along H
    (copied otherwise); bias [V] (any float dtype) or None; labels [n] int64 in [0, V);
    rows [n] int64 indices into hidden (the completion tokens).
    Returns (token_logps [n] fp32, lse [n] fp32, aux): aux["label_logit"] [n] fp32 is the
    labels' raw logit (the backward needs it), and with `stats=True` aux holds STAT_NAMES ->
    [n] fp32 too. Extra memory: [splits, n] fp32 (x6 with stats); no workspace
    (`workspace_bytes` and `workspace` are the twin's).
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
                    num_tokens=num_tokens, stats=stats)
    block_n, block_v = launch.block("BLOCK_N"), launch.block("BLOCK_V")
    n_tiles, v_tiles = triton.cdiv(num_tokens, block_n), triton.cdiv(vocab_size, block_v)
    label_logit = torch.empty(num_tokens, dtype=torch.float32, device=device)
    bias32 = label_logit if bias is None else bias.float().contiguous()   # dummy when unused
    labels, rows = labels.contiguous(), rows.contiguous()

    def launch_kernel(grid, part_lse, part_stats, tiles_per_split, warmup=False):
        args = (hidden, weight, bias32, labels, rows, part_lse, label_logit, part_stats,
                num_tokens, vocab_size, hidden_size, tiles_per_split, hidden.stride(0),
                weight.stride(0), int(bias is not None), float(logit_scale),
                float(softcap or 0.0))
        kwargs = dict(UPCAST=INTERPRET, SOFTCAP=bool(softcap), STATS=stats,
                      **launch.launch_kwargs())
        if warmup:
            return _linear_lse_fwd_kernel.warmup(*args, grid=grid, **kwargs)
        return _linear_lse_fwd_kernel[grid](*args, **kwargs)

    # Split the vocab as far as the compiled kernel's occupancy needs to fill the GPU.
    slots = _forward_slots(device, (hidden.dtype, bool(softcap), stats, launch),
                           # tiles_per_split 3 specialises as real launches do (not 1,
                           # not a multiple of 16): the compile is the one the launch reuses.
                           lambda: launch_kernel((1, 1), label_logit, label_logit, 3, True))
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size \
        if device.type == "cuda" and not INTERPRET else 0
    min_splits = l2_min_splits(slots, block_n * hidden_size * hidden.element_size(),
                               l2_bytes) if l2_bytes else 1
    splits = vocab_splits(n_tiles, v_tiles, slots, min_splits)
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)                # no empty split
    part_lse = torch.empty(splits, num_tokens, dtype=torch.float32, device=device)
    part_stats = torch.empty((5, splits, num_tokens) if stats else (1,), dtype=torch.float32,
                             device=device)
    launch_kernel((splits, n_tiles), part_lse, part_stats, tiles_per_split)
    lse = part_lse[0] if splits == 1 else torch.logsumexp(part_lse, dim=0)
    label_value, _ = label_transform(label_logit, logit_scale, softcap)
    aux = {"label_logit": label_logit}
    if stats:
        aux.update(_combine_stats(part_lse, lse, part_stats, labels, vocab_size))
    return label_value - lse, lse, aux


BACKWARD_METHODS = ("gemm", "atomic")


def linear_token_logps_backward(hidden, weight, bias, labels, rows, lse, grad_token,
                                label_logit=None, logit_scale: float = 1.0, softcap=None,
                                workspace_bytes=None, method: str = "gemm", filter_eps=None,
                                weight_grad: bool = True, vocab_chunk=None, workspace=None,
                                vocab_sorted: bool = False):
    """Gradients of sum(grad_token * token_logps) w.r.t. hidden, weight and bias.

    Same inputs as the forward plus its lse [n] fp32 and grad_token [n] fp32 (`label_logit`
    is accepted for the callers' convenience and not needed). Returns (dhidden [N, H]
    contiguous, zero on rows not listed; dweight [V, H]; dbias [V] or None) in the input
    dtypes, accumulated in fp32.

    method "gemm" (default): per vocab chunk of C rows, `_linear_softmax_grad_kernel` writes
    G = coef * (onehot - softmax) * dz'/dz once into a workspace [n, C] of the input dtype
    (16-bit G for 16-bit inputs), then cuBLAS: dHidden (fp32 [n, H]) += G @ W_chunk and
    dWeight_chunk = G^T @ hidden[rows] (`linear_logps_torch.gemm_backward`). C is the most
    vocab rows whose workspace fits `workspace_bytes` (default
    `configs.DEFAULT_WORKSPACE_BYTES`, 256 MiB: 10,880 rows at 12,288 bf16 tokens). No
    atomics: two runs give bit-identical gradients. Extra memory: the workspace, fp32
    [n, H] and a copy of hidden[rows]. weight_grad=False (a frozen head) skips the dWeight
    GEMM (dweight None). `workspace`: a `linear_logps_torch.Workspace` of
    `backward_layout(..., triton=True)` holding those temporaries (default: allocated here).
    method "atomic": `mixpo.kernels.linear_logps_atomic` (one tile kernel, fp32 atomics,
    optional CCE gradient filter `filter_eps`, optionally over the vocabulary sorted by mean
    logit, `vocab_sorted`; 16-bit dWeight in fp32 chunks of `vocab_chunk` rows; not bitwise
    reproducible).
    """
    if method == "atomic":
        from mixpo.kernels.linear_logps_atomic import linear_token_logps_backward_atomic
        return linear_token_logps_backward_atomic(hidden, weight, bias, labels, rows, lse,
                                                  grad_token, logit_scale, softcap,
                                                  filter_eps, vocab_chunk,
                                                  weight_grad=weight_grad,
                                                  vocab_sorted=vocab_sorted)
    if method != "gemm":
        raise ValueError(f"method must be one of {BACKWARD_METHODS}, got {method!r}")
    if filter_eps is not None or vocab_chunk is not None or vocab_sorted:
        raise ValueError("filter_eps, vocab_chunk and vocab_sorted belong to the atomic backward "
                         "(method='atomic'); the GEMM backward is exact and sizes its chunks "
                         "from workspace_bytes")
    _check(hidden, weight, bias, labels, rows)
    hidden, weight = _unit_stride(hidden), _unit_stride(weight)
    num_tokens, hidden_size = rows.shape[0], weight.shape[1]
    dtype = hidden.dtype
    launch = choose(_spec_name("linear_softmax_grad", dtype), dtype=dtype,
                    num_tokens=num_tokens)
    rows, labels, lse = rows.contiguous(), labels.contiguous(), lse.contiguous()
    coef = grad_token.float().contiguous()
    bias32 = coef if bias is None else bias.float().contiguous()      # dummy when unused

    def fill(v0, v1, grad, _weight_chunk):
        grid = (triton.cdiv(num_tokens, launch.block("BLOCK_N"))
                * triton.cdiv(v1 - v0, launch.block("BLOCK_V")),)
        _linear_softmax_grad_kernel[grid](
            hidden, weight[v0:v1], bias32[v0:v1] if bias is not None else bias32, labels,
            rows, lse, coef, grad, num_tokens, v1 - v0, hidden_size, v0, hidden.stride(0),
            weight.stride(0), grad.stride(0), int(bias is not None), float(logit_scale),
            float(softcap or 0.0), UPCAST=INTERPRET, SOFTCAP=bool(softcap),
            **launch.launch_kwargs())

    if workspace is None and num_tokens:
        workspace = twin.Workspace(twin.backward_layout(num_tokens, weight.shape[0], hidden_size,
                                                        dtype, workspace_bytes, triton=True),
                                   hidden.device)
    return twin.gemm_backward(hidden, weight, bias, rows, fill, dtype, launch.block("BLOCK_V"),
                              workspace_bytes, weight_grad, workspace)


class TritonGroupOps:
    """The one pass's elementwise steps (`mixpo.kernels.linear_one_pass`) with the
    `token_logps` kernels of `mixpo.kernels.logits_logps` over a block's raw fp32 logits
    [t, V]: one read for the log-sum-exp (and stats), one read + write for the gradient in
    place."""

    @staticmethod
    def logps(block, labels, logit_scale, softcap, stats, _raw_rows):
        token_logps, lse, token_stats = logits_logps.token_logps_forward(
            block[None], labels[None], -1, logit_scale, softcap, stats)
        values = [token_stats[name][0] for name in STAT_NAMES] if stats else []
        return lse[0], (token_logps + lse)[0], values, None

    @staticmethod
    def grad_(block, labels, lse, coef, logit_scale, softcap, _state):
        return BlockGrad(logits_logps.token_logps_backward(
            block[None], labels[None], lse[None], coef[None], -1, True, logit_scale,
            softcap)[0])
