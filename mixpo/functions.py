"""The autograd Functions behind the loss API: two stages, each its own Function so that either
front end can feed the shared per-pair epilogue.

1. summed completion log-prob of every sequence, [S] fp32:
   - `LogitsSequenceLogps`: from materialised logits [S, T, V] (one read in forward, one read
     + write in backward, optionally in place);
   - `LinearSequenceLogps`: from hidden states and the LM-head weight, never materialising
     logits (the logit-free path; ignored tokens are compacted away first);
   both apply the logit transform (logit_scale, softcap), optionally also return the
   LD-DPO-weighted sums (`token_weight`) and per-sequence sums of the per-token statistics
   (mean logit, entropy, log sum p^2, label-is-argmax) from the same pass;
2. `PairLoss`: the per-pair epilogue on [B]-sized data (every loss type, target margins,
   MixDPO routing, NLL terms, WPO weights); returns the scalar loss, and its backward hands
   d loss / d logp per sequence to stage 1.

`triton` (a bool, from `mixpo.kernels.dispatch.use_triton`) selects the Triton kernels or
their torch twins. No argument checking here: `mixpo.losses` does it. Stage 1 runs with
autocast off: the front ends have already cast its inputs to the autocast dtype, and the
twins' matmuls and reductions must keep the precision they were written for.
"""
from __future__ import annotations

import torch

from mixpo.kernels import pair_loss_torch
from mixpo.kernels.dispatch import kernel_ops
from mixpo.kernels.logits_logps_torch import STAT_NAMES


def ld_token_weights(labels: torch.Tensor, ignore_index: int, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's per-position weights [2B, T] fp32 (Liu et al. 2024, TRL's ld_alpha): the first
    min(n_w, n_l) completion tokens of both responses of a pair count 1, the rest of the
    longer one ld_alpha; prompt and padding 0."""
    completion = labels != ignore_index
    rank = completion.cumsum(dim=1)                     # 1-based index among completion tokens
    counts = completion.sum(dim=1)
    num_pairs = labels.shape[0] // 2
    shared = torch.minimum(counts[:num_pairs], counts[num_pairs:]).repeat(2)
    weights = torch.where(rank <= shared[:, None], 1.0, ld_alpha)
    return torch.where(completion, weights, 0.0)


def _stat_sums(stats: dict, sequence_of, num_seqs: int, device) -> torch.Tensor:
    """[len(STAT_NAMES), S] per-sequence sums of per-token statistics."""
    if sequence_of is None:                              # [S, T] statistics
        return torch.stack([stats[name].sum(dim=1) for name in STAT_NAMES])
    sums = torch.zeros(len(STAT_NAMES), num_seqs, dtype=torch.float32, device=device)
    for index, name in enumerate(STAT_NAMES):
        sums[index].index_add_(0, sequence_of, stats[name])
    return sums


def _no_autocast(tensor: torch.Tensor):
    return torch.autocast(tensor.device.type, enabled=False)


class LogitsSequenceLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, token_weight, config, triton, inplace_backward):
        ctx.set_materialize_grads(False)
        ops = kernel_ops("logits_logps", triton)
        with _no_autocast(logits):
            token_logps, lse, stats = ops.token_logps_forward(
                logits, labels, config.ignore_index, config.logit_scale, config.softcap,
                config.needs_stats)
        ctx.save_for_backward(logits, labels, lse, token_weight)
        ctx.config, ctx.triton, ctx.inplace = config, triton, inplace_backward
        weighted = (token_logps * token_weight).sum(dim=1) if token_weight is not None \
            else token_logps.new_empty(0)
        stat_sums = _stat_sums(stats, None, logits.shape[0], logits.device) if stats \
            else token_logps.new_empty(0)
        ctx.mark_non_differentiable(stat_sums)
        return token_logps.sum(dim=1), weighted, stat_sums

    @staticmethod
    def backward(ctx, grad_seq, grad_weighted, _grad_stats):
        logits, labels, lse, token_weight = ctx.saved_tensors
        coef = _position_coefficients(grad_seq, grad_weighted, token_weight, labels.shape,
                                      lse.device)
        config = ctx.config
        with _no_autocast(logits):
            dlogits = kernel_ops("logits_logps", ctx.triton).token_logps_backward(
                logits, labels, lse, coef, config.ignore_index, inplace=ctx.inplace,
                logit_scale=config.logit_scale, softcap=config.softcap)
        return dlogits, None, None, None, None, None


def _position_coefficients(grad_seq, grad_weighted, token_weight, shape, device):
    """d loss / d token log-prob of every position [S, T]: the plain sum's gradient plus the
    LD-weighted sum's times each position's weight."""
    coef = torch.zeros(shape, dtype=torch.float32, device=device)
    if grad_seq is not None:
        coef += grad_seq.float()[:, None]
    if grad_weighted is not None and token_weight is not None:
        coef += grad_weighted.float()[:, None] * token_weight
    return coef


def compact_rows(labels: torch.Tensor, ignore_index: int):
    """(rows, sequences): flat indices into [S * T] of the positions with a label, and the
    sequence each belongs to (`torch.nonzero`: one host sync; the trainer's collator computes
    both on the CPU instead)."""
    rows = torch.nonzero(labels.reshape(-1) != ignore_index).squeeze(1)
    return rows, torch.div(rows, labels.shape[-1], rounding_mode="floor")


def ld_row_weights(counts: torch.Tensor, sequences: torch.Tensor, ld_alpha: float):
    """LD-DPO's weight of every compacted row [n] (rows ordered by sequence, as `compact_rows`
    and the collators give them): 1 for the first min(n_w, n_l) completion tokens of a
    pair's responses, ld_alpha past them. Device ops only."""
    counts = counts.to(torch.long)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(sequences.shape[0], device=sequences.device) - starts[sequences] + 1
    num_pairs = counts.shape[0] // 2
    shared = torch.minimum(counts[:num_pairs], counts[num_pairs:]).repeat(2)
    return torch.where(rank <= shared[sequences], 1.0, ld_alpha)


def _sequence_sums(values: torch.Tensor, sequences: torch.Tensor, num_seqs: int):
    sums = torch.zeros(num_seqs, dtype=torch.float64, device=values.device)
    return sums.index_add_(0, sequences, values.double()).float()


class LinearSequenceLogps(torch.autograd.Function):
    """hidden [..., H] (any leading shape: [S, T] padded or [1, L] packed), rows [n] flat
    indices of the completion positions, sequences [n] the sequence of each, num_seqs S,
    row_weight [n] (LD-DPO) or None."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows, sequences, num_seqs, row_weight, config,
                triton):
        ctx.set_materialize_grads(False)
        hidden2d = hidden.reshape(-1, hidden.shape[-1])
        row_labels = labels.reshape(-1)[rows]
        with _no_autocast(hidden):
            token_logps, lse, aux = kernel_ops("linear_logps", triton) \
                .linear_token_logps_forward(hidden2d, weight, bias, row_labels, rows,
                                            config.logit_scale, config.softcap,
                                            config.needs_stats)
        # Sequence sums accumulate in fp64 ([n] values into [S]: nothing to pay): an fp32
        # index_add_ adds one token at a time, and at sums of about -5000 that drifts ~1e-3,
        # ten times a pairwise fp32 sum.
        seq_logps = _sequence_sums(token_logps, sequences, num_seqs)
        weighted = token_logps.new_empty(0)
        if row_weight is not None:
            weighted = _sequence_sums(token_logps * row_weight, sequences, num_seqs)
        stat_sums = _stat_sums(aux, sequences, num_seqs, hidden.device) \
            if config.needs_stats else token_logps.new_empty(0)
        ctx.mark_non_differentiable(stat_sums)
        ctx.save_for_backward(hidden, weight, bias, row_labels, rows, sequences, lse,
                              aux["label_logit"], row_weight)
        ctx.config, ctx.triton = config, triton
        return seq_logps, weighted, stat_sums

    @staticmethod
    def backward(ctx, grad_seq, grad_weighted, _grad_stats):
        (hidden, weight, bias, row_labels, rows, sequences, lse, label_logit,
         row_weight) = ctx.saved_tensors
        grad_token = torch.zeros(rows.shape[0], dtype=torch.float32, device=hidden.device)
        if grad_seq is not None:
            grad_token += grad_seq.float()[sequences]
        if grad_weighted is not None and row_weight is not None:
            grad_token += grad_weighted.float()[sequences] * row_weight
        hidden2d = hidden.reshape(-1, hidden.shape[-1])
        config = ctx.config
        with _no_autocast(hidden):
            dhidden, dweight, dbias = kernel_ops("linear_logps", ctx.triton) \
                .linear_token_logps_backward(hidden2d, weight, bias, row_labels, rows, lse,
                                             grad_token.contiguous(), label_logit,
                                             config.logit_scale, config.softcap,
                                             weight_grad=ctx.needs_input_grad[1])
        return (dhidden.view_as(hidden), dweight,
                dbias if ctx.needs_input_grad[2] else None) + (None,) * 7


class PairLoss(torch.autograd.Function):
    """(loss, per_pair_loss) from the preference log-probs [2B] and the plain log-probs of
    the NLL terms [2B] (the same tensor unless LD-DPO weights the first)."""

    @staticmethod
    def forward(ctx, logps, nll_logps, counts, ref_logps, hard, gamma, weights, config,
                triton):
        out = kernel_ops("pair_loss", triton).pair_loss(logps, nll_logps, counts, ref_logps,
                                                         hard, gamma, weights, config)
        batch_loss, batch_d_logps, batch_d_nll = pair_loss_torch.batch_terms(
            logps, nll_logps, counts, ref_logps, config)
        per_pair_loss = out["per_pair_loss"] + batch_loss
        num_pairs = per_pair_loss.shape[0]
        # d mean / d logps: the per-pair ("diagonal") derivatives over B.
        ctx.save_for_backward((out["d_logps"] + batch_d_logps) / num_pairs,
                              (out["d_nll"] + batch_d_nll) / num_pairs)
        ctx.mark_non_differentiable(per_pair_loss)
        return per_pair_loss.mean(), per_pair_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_pair):
        d_logps, d_nll = ctx.saved_tensors
        return grad_loss * d_logps, grad_loss * d_nll, None, None, None, None, None, None, None
