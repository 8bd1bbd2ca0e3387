"""Plain-torch twin of `mixpo.kernels.logits_logps` (same functions, inputs and outputs): the
CPU backend and the test oracle of the Triton kernels.

Work over [N, V] data is chunked over positions: at most about `CHUNK_BYTES` of fp32 logits
exist at once, so this path never materialises a full fp32 [N, V] tensor, and only the span
of completion positions of each row is read.
"""
from __future__ import annotations

import torch

# fp32 bytes of logits alive at once in the chunked loops (per chunk of tokens). The
# logit-free path takes bigger chunks: each chunk re-reads the whole [V, H] weight.
CHUNK_BYTES = 64 * 2**20
LINEAR_CHUNK_BYTES = 128 * 2**20


def _rows_per_chunk(vocab_size: int, budget: int | None = None) -> int:
    return max(1, (budget or CHUNK_BYTES) // (4 * vocab_size))


def _row_chunks(num_rows: int, chunk: int):
    for start in range(0, num_rows, chunk):
        yield start, min(start + chunk, num_rows)


def _completion_span(labels_row, ignore_index):
    """(first, end) bounding the completion positions of one row; prompt before, padding
    after are outside it (positions inside that are ignored get masked)."""
    positions = torch.nonzero(labels_row != ignore_index)
    if positions.numel() == 0:
        return 0, 0
    return int(positions[0]), int(positions[-1]) + 1


def token_logps_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """Per-token log-prob of the label and log-sum-exp, chunked over positions.

    logits [S, T, V] (any float dtype, last dim contiguous), labels [S, T] int64.
    Returns (token_logps [S, T] fp32, 0 where ignored; lse [S, T] fp32, 0 where ignored).
    Only the span of completion positions of each row is read (prompt and padding are not).
    """
    num_seqs, seq_len, vocab_size = logits.shape
    token_logps = torch.zeros(num_seqs, seq_len, dtype=torch.float32, device=logits.device)
    lse = torch.zeros_like(token_logps)
    chunk = _rows_per_chunk(vocab_size)
    for seq in range(num_seqs):
        first, end = _completion_span(labels[seq], ignore_index)
        for t0, t1 in _row_chunks(end - first, chunk):
            t0, t1 = first + t0, first + t1
            block = logits[seq, t0:t1].float()           # [t, V]; a view when already fp32
            label = labels[seq, t0:t1]
            valid = label != ignore_index
            block_lse = torch.logsumexp(block, dim=-1)
            label_logit = block.gather(-1, label.clamp(min=0)[:, None]).squeeze(-1)
            lse[seq, t0:t1] = torch.where(valid, block_lse, 0.0)
            token_logps[seq, t0:t1] = torch.where(valid, label_logit - block_lse, 0.0)
    return token_logps, lse


def token_logps_backward(logits, labels, lse, grad_seq, ignore_index=-100, inplace=False):
    """dlogits = grad_seq[seq] * (onehot(label) - softmax) on completion tokens, 0 elsewhere.

    grad_seq [S] fp32 is dLoss/d(summed sequence log-prob). With `inplace=True` the result is
    written into `logits` itself (its values are consumed), so no second [N, V] buffer exists.
    """
    num_seqs, seq_len, vocab_size = logits.shape
    dlogits = logits if inplace else torch.empty_like(logits)
    chunk = _rows_per_chunk(vocab_size)
    for seq in range(num_seqs):
        first, end = _completion_span(labels[seq], ignore_index)
        dlogits[seq, :first] = 0
        dlogits[seq, end:] = 0
        for t0, t1 in _row_chunks(end - first, chunk):
            t0, t1 = first + t0, first + t1
            label = labels[seq, t0:t1]
            coef = torch.where(label != ignore_index, grad_seq[seq].float(), 0.0)[:, None]
            # In-place ops on one fp32 chunk buffer: exp(x - lse) * -coef, + coef at label
            # (.float() of 16-bit logits is already a fresh buffer; of fp32 ones, a view).
            block = logits[seq, t0:t1]
            grad = block.float().sub_(lse[seq, t0:t1, None]) if block.dtype != torch.float32 \
                else block - lse[seq, t0:t1, None]
            grad.exp_().mul_(-coef)
            grad.scatter_add_(-1, label.clamp(min=0)[:, None], coef)
            dlogits[seq, t0:t1].copy_(grad)
    return dlogits
