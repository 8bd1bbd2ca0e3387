"""Per-token label log-probs over materialised logits: one read forward, one read+write backward.

Forward: an online log-sum-exp over vocab blocks per position, gathering the label's logit on
the way; only per-token values (fp32, [S, T]) leave the kernel, so no log_softmax tensor and
no fp32 copy of bf16 logits ever exists. With `stats=True` the same pass also accumulates,
per position, the mean logit over the vocabulary, the entropy, log sum_v p_v^2 and whether the
label is the (first) argmax (TRL's logits/*, entropy, mean_token_accuracy and WPO inputs).
Backward: dlogits = coef[pos] * (onehot(label) - softmax) * dz'/dz, optionally written into
the logits buffer itself (flash-attention style in-place backward).
Logit transform (Gemma-2, Cohere, Granite heads): the model's logits are
z' = softcap * tanh(logit_scale * z / softcap), or logit_scale * z without softcap; applied to
each loaded tile in registers, with its derivative logit_scale * (1 - tanh^2) in backward.
Positions whose label is ignore_index (prompt, padding) are never read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixpo.kernels.configs import choose
from mixpo.kernels.logits_logps_torch import STAT_NAMES


@triton.jit
def transform_logits(z, logit_scale, softcap, SOFTCAP: tl.constexpr):
    """(z', tanh term) of raw fp32 logits: softcap * tanh(logit_scale * z / softcap) or
    logit_scale * z. tanh(x) = 2 sigmoid(2x) - 1 (no tanh in every Triton backend)."""
    if SOFTCAP:
        tanh = 2.0 * tl.sigmoid(2.0 * logit_scale * z / softcap) - 1.0
        return softcap * tanh, tanh
    return logit_scale * z, z


@triton.jit
def transform_slope(tanh, logit_scale, SOFTCAP: tl.constexpr):
    """dz'/dz from the tanh term of `transform_logits`."""
    if SOFTCAP:
        return logit_scale * (1.0 - tanh * tanh)
    # Not 0 * tanh: tanh is z here, and 0 * -inf (a masked vocabulary entry) is NaN.
    return tl.zeros_like(tanh) + logit_scale


@triton.jit
def _token_logps_fwd_kernel(logits_ptr, labels_ptr, token_logps_ptr, lse_ptr, stats_ptr,
                            num_rows, seq_len, vocab_size, stride_seq, stride_pos,
                            ignore_index, logit_scale, softcap,
                            SOFTCAP: tl.constexpr, STATS: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    # Each program owns BLOCK_N flattened positions row = seq * seq_len + pos.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_in_range = rows < num_rows
    labels = tl.load(labels_ptr + rows, mask=row_in_range, other=ignore_index)
    active = row_in_range & (labels != ignore_index)
    # logits may be a strided view (e.g. logits[:, :-1]); locate each row by (seq, pos).
    row_start = (rows // seq_len) * stride_seq + (rows % seq_len) * stride_pos

    running_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_N], tl.float32)
    label_logit = tl.zeros([BLOCK_N], tl.float32)
    # STATS: sum exp(z' - max) z', sum exp(2 (z' - max)), sum z', first argmax.
    running_ez = tl.zeros([BLOCK_N], tl.float32)
    running_sq = tl.zeros([BLOCK_N], tl.float32)
    running_z = tl.zeros([BLOCK_N], tl.float32)
    argmax = tl.zeros([BLOCK_N], tl.int64)
    for vocab_start in range(0, vocab_size, BLOCK_V):
        cols = vocab_start + tl.arange(0, BLOCK_V)
        in_vocab = cols[None, :] < vocab_size
        mask = active[:, None] & in_vocab
        # Cast at once: accumulate in fp32 (and the interpreter mishandles bf16 arithmetic).
        raw = tl.load(logits_ptr + row_start[:, None] + cols[None, :], mask=mask,
                      other=0.0).to(tl.float32)
        block, _ = transform_logits(raw, logit_scale, softcap, SOFTCAP)
        block = tl.where(mask, block, float("-inf"))
        block_max, block_arg = tl.max(block, axis=1, return_indices=True,
                                      return_indices_tie_break_left=True)
        new_max = tl.maximum(running_max, block_max)
        # Rows with nothing seen yet keep max -inf; shift by 0 there to avoid inf - inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(running_max - shift)
        exp_block = tl.exp(block - shift[:, None])
        running_sum = running_sum * rescale + tl.sum(exp_block, axis=1)
        label_logit += tl.sum(tl.where(cols[None, :] == labels[:, None], block, 0.0), axis=1)
        if STATS:
            finite = tl.where(mask, block, 0.0)
            # p z' = 0 where z' = -inf (a masked entry; 0 log 0 = 0 in the entropy), never
            # 0 * -inf.
            weighted = tl.where(block > float("-inf"), block, 0.0)
            running_ez = running_ez * rescale + tl.sum(exp_block * weighted, axis=1)
            running_sq = running_sq * rescale * rescale + tl.sum(exp_block * exp_block, axis=1)
            running_z += tl.sum(finite, axis=1)
            # Strictly greater: an earlier block keeps a tie (the first argmax wins).
            argmax = tl.where(block_max > running_max, vocab_start + block_arg, argmax)
        running_max = new_max
    # Inactive rows never summed anything; log(1) keeps their (discarded) lse finite.
    safe_sum = tl.where(active, running_sum, 1.0)
    lse = running_max + tl.log(safe_sum)
    tl.store(lse_ptr + rows, tl.where(active, lse, 0.0), mask=row_in_range)
    tl.store(token_logps_ptr + rows, tl.where(active, label_logit - lse, 0.0), mask=row_in_range)
    if STATS:
        # stats [4, num_rows]: mean logit, entropy, log sum p^2, label == first argmax.
        mean_logit = running_z / vocab_size
        entropy = lse - running_ez / safe_sum
        log_sum_sq = tl.log(tl.where(active, running_sq, 1.0)) - 2.0 * tl.log(safe_sum)
        top1 = (argmax == labels).to(tl.float32)
        tl.store(stats_ptr + rows, tl.where(active, mean_logit, 0.0), mask=row_in_range)
        tl.store(stats_ptr + num_rows + rows, tl.where(active, entropy, 0.0), mask=row_in_range)
        tl.store(stats_ptr + 2 * num_rows + rows, tl.where(active, log_sum_sq, 0.0),
                 mask=row_in_range)
        tl.store(stats_ptr + 3 * num_rows + rows, tl.where(active, top1, 0.0), mask=row_in_range)


@triton.jit
def _token_logps_bwd_kernel(logits_ptr, dlogits_ptr, labels_ptr, lse_ptr, coef_ptr,
                            num_rows, seq_len, vocab_size, stride_seq, stride_pos,
                            dstride_seq, dstride_pos, ignore_index, logit_scale, softcap,
                            SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_V: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_in_range = rows < num_rows
    labels = tl.load(labels_ptr + rows, mask=row_in_range, other=ignore_index)
    active = row_in_range & (labels != ignore_index)
    seq = rows // seq_len
    pos = rows % seq_len
    row_start = seq * stride_seq + pos * stride_pos
    drow_start = seq * dstride_seq + pos * dstride_pos
    lse = tl.load(lse_ptr + rows, mask=active, other=0.0)
    # d loss / d token log-prob of this position; 0 on prompt and padding.
    coef = tl.where(active, tl.load(coef_ptr + rows, mask=row_in_range, other=0.0), 0.0)
    for vocab_start in range(0, vocab_size, BLOCK_V):
        cols = vocab_start + tl.arange(0, BLOCK_V)
        col_in_range = cols[None, :] < vocab_size
        raw = tl.load(logits_ptr + row_start[:, None] + cols[None, :],
                      mask=active[:, None] & col_in_range, other=0.0).to(tl.float32)
        block, tanh = transform_logits(raw, logit_scale, softcap, SOFTCAP)
        probs = tl.exp(block - lse[:, None])
        onehot = (cols[None, :] == labels[:, None]).to(tl.float32)
        grad = coef[:, None] * (onehot - probs) * transform_slope(tanh, logit_scale, SOFTCAP)
        grad = tl.where(active[:, None], grad, 0.0)
        tl.store(dlogits_ptr + drow_start[:, None] + cols[None, :],
                 grad.to(dlogits_ptr.dtype.element_ty),
                 mask=row_in_range[:, None] & col_in_range)


def token_logps_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                        logit_scale: float = 1.0, softcap: float | None = None,
                        stats: bool = False):
    """Per-token label log-prob and LSE of the transformed logits (module docstring).

    logits [S, T, V] fp32/bf16/fp16 with unit stride along V (other strides free);
    labels [S, T] int64 in [0, V) or ignore_index.
    Returns (token_logps [S, T] fp32, lse [S, T] fp32, stats), 0 where ignored; stats is None
    or a dict of STAT_NAMES -> [S, T] fp32.
    """
    num_seqs, seq_len, vocab_size = logits.shape
    labels = labels.contiguous()
    token_logps = torch.empty(num_seqs, seq_len, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(token_logps)
    stat_buffer = torch.empty((len(STAT_NAMES) if stats else 1, num_seqs, seq_len),
                              dtype=torch.float32, device=logits.device)
    launch = choose("token_logps_fwd", vocab_size=vocab_size)
    num_rows = num_seqs * seq_len
    grid = (triton.cdiv(num_rows, launch.block("BLOCK_N")),)
    _token_logps_fwd_kernel[grid](logits, labels, token_logps, lse, stat_buffer, num_rows,
                                  seq_len, vocab_size, logits.stride(0), logits.stride(1),
                                  ignore_index, float(logit_scale), float(softcap or 0.0),
                                  SOFTCAP=bool(softcap), STATS=stats, **launch.launch_kwargs())
    return token_logps, lse, (dict(zip(STAT_NAMES, stat_buffer)) if stats else None)


def token_logps_backward(logits, labels, lse, coef, ignore_index=-100, inplace=False,
                         logit_scale: float = 1.0, softcap: float | None = None):
    """dlogits [S, T, V] (logits' dtype) = coef[s, t] * (onehot(label) - softmax) * dz'/dz.

    coef [S, T] fp32: d loss / d token log-prob of each position. Ignored positions get 0.
    inplace=True writes into `logits` (its values are consumed) and returns it.
    """
    num_seqs, seq_len, vocab_size = logits.shape
    labels = labels.contiguous()
    dlogits = logits if inplace else torch.empty_like(logits)
    launch = choose("token_logps_bwd", vocab_size=vocab_size)
    num_rows = num_seqs * seq_len
    grid = (triton.cdiv(num_rows, launch.block("BLOCK_N")),)
    _token_logps_bwd_kernel[grid](logits, dlogits, labels, lse, coef.float().contiguous(),
                                  num_rows, seq_len, vocab_size, logits.stride(0),
                                  logits.stride(1), dlogits.stride(0), dlogits.stride(1),
                                  ignore_index, float(logit_scale), float(softcap or 0.0),
                                  SOFTCAP=bool(softcap), **launch.launch_kwargs())
    return dlogits
