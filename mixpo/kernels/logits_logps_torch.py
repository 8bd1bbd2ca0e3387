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


def transform_logits(block: torch.Tensor, logit_scale: float, softcap):
    """The model's logits from raw fp32 ones, in place: softcap * tanh(logit_scale * z /
    softcap), or logit_scale * z (see mixpo.kernels.logits_logps)."""
    if softcap:
        return block.mul_(logit_scale / softcap).tanh_().mul_(softcap)
    return block.mul_(logit_scale) if logit_scale != 1.0 else block


def transform_slope(transformed: torch.Tensor, logit_scale: float, softcap):
    """dz'/dz as a function of z' (in place on a scratch copy): logit_scale * (1 - (z' /
    softcap)^2), or the constant logit_scale."""
    if softcap:
        return transformed.div_(softcap).square_().neg_().add_(1.0).mul_(logit_scale)
    return logit_scale


def block_stats(block: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor) -> list:
    """STAT_NAMES of a [t, V] fp32 block of transformed logits (its log-sum-exp `lse` [t]):
    mean logit, entropy, log sum_v p^2, label == first argmax (each [t] fp32)."""
    probs = (block - lse[:, None]).exp_()
    # 0 log 0 = 0: an entry with p = 0 (z' = -inf, a masked entry) adds nothing.
    entropy = lse - torch.where(probs > 0, probs * block, 0.0).sum(-1)
    log_sum_sq = probs.square_().sum(-1).log_()
    top1 = (block.argmax(-1) == labels).float()   # torch's argmax takes the first maximum
    return [block.mean(-1), entropy, log_sum_sq, top1]


STAT_NAMES = ("mean_logit", "entropy", "log_sum_sq", "top1")


def token_logps_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                        logit_scale: float = 1.0, softcap=None, stats: bool = False):
    """Per-token log-prob of the label and log-sum-exp of the transformed logits, chunked
    over positions (same contract as the Triton launch helper).

    logits [S, T, V] (any float dtype, last dim contiguous), labels [S, T] int64.
    Returns (token_logps [S, T] fp32, lse [S, T] fp32, stats: None or STAT_NAMES -> [S, T]
    fp32), 0 where ignored. Only the span of completion positions of each row is read.
    """
    num_seqs, seq_len, vocab_size = logits.shape
    token_logps = torch.zeros(num_seqs, seq_len, dtype=torch.float32, device=logits.device)
    lse = torch.zeros_like(token_logps)
    stat_values = torch.zeros((len(STAT_NAMES) if stats else 0, num_seqs, seq_len),
                              dtype=torch.float32, device=logits.device)
    chunk = _rows_per_chunk(vocab_size)
    for seq in range(num_seqs):
        first, end = _completion_span(labels[seq], ignore_index)
        for t0, t1 in _row_chunks(end - first, chunk):
            t0, t1 = first + t0, first + t1
            block = logits[seq, t0:t1].float()           # [t, V]; a view when already fp32
            if logit_scale != 1.0 or softcap:               # in place: on a copy, not the input
                block = transform_logits(block.clone() if logits.dtype == torch.float32
                                         else block, logit_scale, softcap)
            label = labels[seq, t0:t1]
            valid = label != ignore_index
            block_lse = torch.logsumexp(block, dim=-1)
            label_logit = block.gather(-1, label.clamp(min=0)[:, None]).squeeze(-1)
            lse[seq, t0:t1] = torch.where(valid, block_lse, 0.0)
            token_logps[seq, t0:t1] = torch.where(valid, label_logit - block_lse, 0.0)
            if stats:
                for index, value in enumerate(block_stats(block, block_lse, label)):
                    stat_values[index, seq, t0:t1] = torch.where(valid, value, 0.0)
    return token_logps, lse, (dict(zip(STAT_NAMES, stat_values)) if stats else None)


def token_logps_backward(logits, labels, lse, coef, ignore_index=-100, inplace=False,
                         logit_scale: float = 1.0, softcap=None):
    """dlogits = coef[s, t] * (onehot(label) - softmax) * dz'/dz on completion positions, 0
    elsewhere (same contract as the Triton launch helper).

    coef [S, T] fp32 is dLoss/d(token log-prob). With `inplace=True` the result is written
    into `logits` itself (its values are consumed), so no second [N, V] buffer exists.
    """
    num_seqs, seq_len, vocab_size = logits.shape
    dlogits = logits if inplace else torch.empty_like(logits)
    chunk = _rows_per_chunk(vocab_size)
    transformed = logit_scale != 1.0 or bool(softcap)
    for seq in range(num_seqs):
        first, end = _completion_span(labels[seq], ignore_index)
        dlogits[seq, :first] = 0
        dlogits[seq, end:] = 0
        for t0, t1 in _row_chunks(end - first, chunk):
            t0, t1 = first + t0, first + t1
            label = labels[seq, t0:t1]
            row_coef = torch.where(label != ignore_index, coef[seq, t0:t1].float(), 0.0)[:, None]
            block = logits[seq, t0:t1]
            # One fp32 chunk buffer, in-place ops: exp(z' - lse) * -coef, + coef at the label,
            # times dz'/dz (.float() of 16-bit logits is already a fresh buffer).
            grad = block.float().clone() if block.dtype == torch.float32 else block.float()
            if transformed:
                grad = transform_logits(grad, logit_scale, softcap)
                slope = transform_slope(grad.clone(), logit_scale, softcap) if softcap \
                    else logit_scale
            grad.sub_(lse[seq, t0:t1, None]).exp_().mul_(-row_coef)
            grad.scatter_add_(-1, label.clamp(min=0)[:, None], row_coef)
            if transformed:
                grad.mul_(slope)
            dlogits[seq, t0:t1].copy_(grad)
    return dlogits
