"""Per-token label log-probs over materialised logits: one read forward, one read+write backward.

Forward: an online log-sum-exp over vocab blocks per position, gathering the label's logit on
the way; only the per-token log-prob and LSE (fp32, [S, T]) leave the kernel, so no
log_softmax tensor and no fp32 copy of bf16 logits ever exists.
Backward: dlogits = grad_seq[seq] * (onehot(label) - exp(logits - lse)), optionally written
into the logits buffer itself (flash-attention style in-place backward).
Positions whose label is ignore_index (prompt, padding) are never read.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mixpo.kernels.configs import choose


@triton.jit
def _token_logps_fwd_kernel(logits_ptr, labels_ptr, token_logps_ptr, lse_ptr,
                            num_rows, seq_len, vocab_size, stride_seq, stride_pos,
                            ignore_index, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
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
    for vocab_start in range(0, vocab_size, BLOCK_V):
        cols = vocab_start + tl.arange(0, BLOCK_V)
        mask = active[:, None] & (cols[None, :] < vocab_size)
        # Cast at once: accumulate in fp32 (and the interpreter mishandles bf16 arithmetic).
        block = tl.load(logits_ptr + row_start[:, None] + cols[None, :], mask=mask,
                        other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(block, axis=1))
        # Rows with nothing seen yet keep max -inf; shift by 0 there to avoid inf - inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) \
            + tl.sum(tl.exp(block - shift[:, None]), axis=1)
        running_max = new_max
        label_logit += tl.sum(tl.where(cols[None, :] == labels[:, None], block, 0.0), axis=1)
    # Inactive rows never summed anything; log(1) keeps their (discarded) lse finite.
    lse = running_max + tl.log(tl.where(active, running_sum, 1.0))
    tl.store(lse_ptr + rows, tl.where(active, lse, 0.0), mask=row_in_range)
    tl.store(token_logps_ptr + rows, tl.where(active, label_logit - lse, 0.0), mask=row_in_range)


@triton.jit
def _token_logps_bwd_kernel(logits_ptr, dlogits_ptr, labels_ptr, lse_ptr, grad_seq_ptr,
                            num_rows, seq_len, vocab_size, stride_seq, stride_pos,
                            dstride_seq, dstride_pos, ignore_index,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_in_range = rows < num_rows
    labels = tl.load(labels_ptr + rows, mask=row_in_range, other=ignore_index)
    active = row_in_range & (labels != ignore_index)
    seq = rows // seq_len
    pos = rows % seq_len
    row_start = seq * stride_seq + pos * stride_pos
    drow_start = seq * dstride_seq + pos * dstride_pos
    lse = tl.load(lse_ptr + rows, mask=active, other=0.0)
    # d loss / d logp of this position's sequence; 0 on prompt and padding.
    coef = tl.where(active, tl.load(grad_seq_ptr + seq, mask=row_in_range, other=0.0), 0.0)
    for vocab_start in range(0, vocab_size, BLOCK_V):
        cols = vocab_start + tl.arange(0, BLOCK_V)
        col_in_range = cols[None, :] < vocab_size
        block = tl.load(logits_ptr + row_start[:, None] + cols[None, :],
                        mask=active[:, None] & col_in_range, other=0.0).to(tl.float32)
        probs = tl.exp(block - lse[:, None])
        onehot = (cols[None, :] == labels[:, None]).to(tl.float32)
        grad = tl.where(active[:, None], coef[:, None] * (onehot - probs), 0.0)
        tl.store(dlogits_ptr + drow_start[:, None] + cols[None, :],
                 grad.to(dlogits_ptr.dtype.element_ty),
                 mask=row_in_range[:, None] & col_in_range)


def token_logps_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """Per-token label log-prob and LSE.

    logits [S, T, V] fp32/bf16/fp16 with unit stride along V (other strides free);
    labels [S, T] int64 in [0, V) or ignore_index.
    Returns (token_logps [S, T] fp32, 0 where ignored; lse [S, T] fp32, 0 where ignored).
    """
    num_seqs, seq_len, vocab_size = logits.shape
    labels = labels.contiguous()
    token_logps = torch.empty(num_seqs, seq_len, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(token_logps)
    launch = choose("token_logps_fwd", vocab_size=vocab_size)
    num_rows = num_seqs * seq_len
    grid = (triton.cdiv(num_rows, launch.block("BLOCK_N")),)
    _token_logps_fwd_kernel[grid](logits, labels, token_logps, lse, num_rows, seq_len,
                                  vocab_size, logits.stride(0), logits.stride(1), ignore_index,
                                  **launch.launch_kwargs())
    return token_logps, lse


def token_logps_backward(logits, labels, lse, grad_seq, ignore_index=-100, inplace=False):
    """dlogits [S, T, V] (logits' dtype) = grad_seq[s] * (onehot(label) - softmax(logits)).

    grad_seq [S] fp32: d loss / d summed log-prob of each sequence. Ignored positions get 0.
    inplace=True writes into `logits` (its values are consumed) and returns it.
    """
    num_seqs, seq_len, vocab_size = logits.shape
    labels = labels.contiguous()
    dlogits = logits if inplace else torch.empty_like(logits)
    launch = choose("token_logps_bwd", vocab_size=vocab_size)
    num_rows = num_seqs * seq_len
    grid = (triton.cdiv(num_rows, launch.block("BLOCK_N")),)
    _token_logps_bwd_kernel[grid](logits, dlogits, labels, lse, grad_seq, num_rows, seq_len,
                                  vocab_size, logits.stride(0), logits.stride(1),
                                  dlogits.stride(0), dlogits.stride(1), ignore_index,
                                  **launch.launch_kwargs())
    return dlogits
