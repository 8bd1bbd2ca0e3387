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
`LinearOnePassLoss` fuses both stages of the logit-free path when every pair's gradient
coefficient depends on that pair only (`plan_linear_passes` decides): one pass over groups of
whole pairs computes the loss and its exact gradient, 6nVH FLOPs instead of 8nVH.

`triton` (a bool, from `mixpo.kernels.dispatch.use_triton`) selects the Triton kernels or
their torch twins. No argument checking here: `mixpo.losses` does it. Stage 1 runs with
autocast off: the front ends have already cast its inputs to the autocast dtype, and the
twins' matmuls and reductions must keep the precision they were written for.
"""
from __future__ import annotations

import logging

import torch

from mixpo.kernels import pair_loss_torch
from mixpo.kernels.dispatch import kernel_ops
from mixpo.kernels.linear_logps_torch import workspace_rows
from mixpo.kernels.logits_logps_torch import STAT_NAMES

logger = logging.getLogger(__name__)
PASSES = ("auto", 1, 2)


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
                triton, workspace_bytes=None):
        ctx.set_materialize_grads(False)
        hidden2d = hidden.reshape(-1, hidden.shape[-1])
        row_labels = labels.reshape(-1)[rows]
        with _no_autocast(hidden):
            token_logps, lse, aux = kernel_ops("linear_logps", triton) \
                .linear_token_logps_forward(hidden2d, weight, bias, row_labels, rows,
                                            config.logit_scale, config.softcap,
                                            config.needs_stats, workspace_bytes=workspace_bytes)
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
        ctx.config, ctx.triton, ctx.workspace_bytes = config, triton, workspace_bytes
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
                                             workspace_bytes=ctx.workspace_bytes,
                                             weight_grad=ctx.needs_input_grad[1])
        return (dhidden.view_as(hidden), dweight if ctx.needs_input_grad[1] else None,
                dbias if ctx.needs_input_grad[2] else None) + (None,) * 8


def pair_values(logps, nll_logps, counts, ref_logps, hard, gamma, weights, config, triton):
    """(per_pair_loss [B], d_logps [2B], d_nll [2B]): the per-pair epilogue plus the batch
    terms; derivatives of each pair's loss (the caller averages over pairs)."""
    out = kernel_ops("pair_loss", triton).pair_loss(logps, nll_logps, counts, ref_logps, hard,
                                                     gamma, weights, config)
    batch_loss, batch_d_logps, batch_d_nll = pair_loss_torch.batch_terms(
        logps, nll_logps, counts, ref_logps, config)
    return (out["per_pair_loss"] + batch_loss, out["d_logps"] + batch_d_logps,
            out["d_nll"] + batch_d_nll)


class PairLoss(torch.autograd.Function):
    """(loss, per_pair_loss) from the preference log-probs [2B] and the plain log-probs of
    the NLL terms [2B] (the same tensor unless LD-DPO weights the first)."""

    @staticmethod
    def forward(ctx, logps, nll_logps, counts, ref_logps, hard, gamma, weights, config,
                triton):
        per_pair_loss, d_logps, d_nll = pair_values(logps, nll_logps, counts, ref_logps, hard,
                                                    gamma, weights, config, triton)
        num_pairs = per_pair_loss.shape[0]
        # d mean / d logps: the per-pair ("diagonal") derivatives over B.
        ctx.save_for_backward(d_logps / num_pairs, d_nll / num_pairs)
        ctx.mark_non_differentiable(per_pair_loss)
        return per_pair_loss.mean(), per_pair_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_pair):
        d_logps, d_nll = ctx.saved_tensors
        return grad_loss * d_logps, grad_loss * d_nll, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# One pass: the logit-free loss and its exact gradient together
# ----------------------------------------------------------------------------------------------
_LOGGED: set = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.info(message)


def plan_linear_passes(config, margin, passes, weight, num_tokens: int, sequences, counts,
                       workspace_bytes=None):
    """One pass or two for the logit-free loss: None (two passes: forward, then a backward
    that recomputes the logits) or the one-pass groups, a list of (pair indices [k], token
    indices [t]) in pair order. The choice is logged once per distinct reason.

    One pass needs (1) every pair's gradient coefficient to depend on that pair only: not
    AOT's sorted losses nor an adaptive margin (gamma-PO's solve couples the batch); TRL's
    batch NLL normalisation only needs the batch's chosen-token count, known before the
    pass; (2) every pair's fp32 logits [t, V] to fit the workspace (`workspace_bytes`); (3)
    for 16-bit weights, a single group (more would accumulate dWeight in fp32 [V, H], which
    the two-pass backward never holds). passes=1 forces one pass where (1) holds (groups of
    one pair past the budget, fp32 dWeight accumulator if needed); passes=2 forces two.
    `counts` [2B] are the sequences' completion-token counts (read on the host: one sync).
    """
    if passes not in PASSES:
        raise ValueError(f"passes must be one of {PASSES}, got {passes!r}")
    if passes == 2:
        return None
    coupled = "aot / aot_unpaired sort the batch" if config.sorted_types else \
        "an adaptive margin solves over the batch" if margin is not None else None
    if coupled:
        if passes == 1:
            raise ValueError(f"passes=1 needs per-pair gradient coefficients: {coupled}")
        _log_once(f"mixpo: logit-free loss in two passes ({coupled})")
        return None
    vocab_size, forced = weight.shape[0], passes == 1
    capacity = workspace_rows(vocab_size, 4, workspace_bytes)
    if weight.dtype != torch.float32 and num_tokens > capacity and not forced:
        _log_once(f"mixpo: logit-free loss in two passes (the batch's {num_tokens} tokens x "
                  f"{vocab_size} fp32 logits exceed the workspace: one pass with 16-bit "
                  "weights would accumulate dWeight in fp32 [V, H])")
        return None
    seq_counts = [int(count) for count in counts.tolist()]
    num_pairs = len(seq_counts) // 2
    pair_tokens = [seq_counts[i] + seq_counts[num_pairs + i] for i in range(num_pairs)]
    if max(pair_tokens) > capacity and not forced:
        _log_once(f"mixpo: logit-free loss in two passes (a pair's {max(pair_tokens)} tokens "
                  f"x {vocab_size} fp32 logits exceed the workspace of {capacity} tokens)")
        return None
    pair_groups, current, size = [], [], 0
    for pair, tokens in enumerate(pair_tokens):
        if current and size + tokens > capacity:
            pair_groups.append(current)
            current, size = [], 0
        current.append(pair)
        size += tokens
    pair_groups.append(current)
    _log_once(f"mixpo: logit-free loss in one pass ({'forced' if forced else 'per-pair loss'},"
              f" {len(pair_groups)} group(s) of pairs in the workspace)")
    # Token indices of each sequence: rows sorted by sequence (already sorted when they come
    # from `compact_rows` or the collators).
    order = torch.argsort(sequences, stable=True)
    starts = [0]
    for count in seq_counts:
        starts.append(starts[-1] + count)
    groups = []
    for pairs in pair_groups:
        members = pairs + [num_pairs + pair for pair in pairs]
        tokens = torch.cat([order[starts[seq]:starts[seq + 1]] for seq in members])
        groups.append((torch.tensor(pairs, device=sequences.device), tokens))
    return groups


class LinearOnePassLoss(torch.autograd.Function):
    """The logit-free loss, forward and exact gradient in one pass over the `groups` of
    `plan_linear_passes`. Inputs as `LinearSequenceLogps` plus the per-pair ones of
    `PairLoss` (counts [2B], ref_logps, hard, gamma [B]) and `pair_weights(logps [2k],
    stat_sums [4, 2k], counts [2k]) -> [k]` (WPO) or None. Returns (loss, per_pair_loss,
    seq_logps [2B], weighted [2B] or empty, stat_sums [4, 2B] or empty); only `loss` carries
    gradient: its backward scales the gradients computed in forward (once: they are scaled
    in place)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows, sequences, row_weight, counts,
                ref_logps, hard, gamma, pair_weights, config, triton, groups):
        hidden2d = hidden.reshape(-1, hidden.shape[-1])
        row_labels = labels.reshape(-1)[rows]
        num_seqs, device = counts.shape[0], hidden.device
        num_pairs = num_seqs // 2
        zeros = torch.zeros(num_seqs, dtype=torch.float32, device=device)
        # TRL's batch NLL term: its derivative needs only the batch's chosen-token count.
        _, _, batch_d_nll = pair_loss_torch.batch_terms(zeros, zeros, counts, None, config)
        seq_sums = torch.zeros(num_seqs, dtype=torch.float64, device=device)
        weighted_sums = torch.zeros_like(seq_sums) if row_weight is not None else None
        stat_sums = torch.zeros(len(STAT_NAMES), num_seqs, dtype=torch.float32, device=device)

        def coefficients(position, token_logps, aux):
            pairs, tokens = groups[position]
            seqs = sequences[tokens]
            members = torch.cat([pairs, pairs + num_pairs])
            seq_sums.index_add_(0, seqs, token_logps.double())
            logps = seq_sums[members].float()
            preference = logps
            if weighted_sums is not None:
                weighted_sums.index_add_(0, seqs, (token_logps * row_weight[tokens]).double())
                preference = weighted_sums[members].float()
            if config.needs_stats:
                for index, name in enumerate(STAT_NAMES):
                    stat_sums[index].index_add_(0, seqs, aux[name])
            weights = None if pair_weights is None else \
                pair_weights(logps, stat_sums[:, members], counts[members])
            # The per-pair epilogue on the group's pairs; the batch terms' only derivative
            # here (no sorted types) is the batch NLL's, from the whole batch's counts.
            out = kernel_ops("pair_loss", triton).pair_loss(
                preference, logps, counts[members],
                None if ref_logps is None else ref_logps[members],
                None if hard is None else hard[pairs], gamma[pairs], weights, config)
            d_logps, d_nll = out["d_logps"], out["d_nll"] + batch_d_nll[members]
            # d mean / d (plain and weighted) sequence sums, then per token (as the two-pass
            # LinearSequenceLogps.backward forms grad_token).
            d_plain, d_weighted = torch.zeros_like(zeros), torch.zeros_like(zeros)
            if weighted_sums is None:
                d_plain[members] = (d_logps + d_nll) / num_pairs
            else:
                d_plain[members] = d_nll / num_pairs
                d_weighted[members] = d_logps / num_pairs
            coef = d_plain[seqs]
            if weighted_sums is not None:
                coef = coef + d_weighted[seqs] * row_weight[tokens]
            return coef

        with _no_autocast(hidden):
            token_logps, _, aux, dhidden, dweight, dbias = kernel_ops("linear_logps", triton) \
                .linear_token_logps_one_pass(hidden2d, weight, bias, row_labels, rows,
                                             [tokens for _, tokens in groups], coefficients,
                                             config.logit_scale, config.softcap,
                                             config.needs_stats,
                                             weight_grad=weight.requires_grad)
        seq_logps = seq_sums.float()
        preference = seq_logps if weighted_sums is None else weighted_sums.float()
        weights = None if pair_weights is None else pair_weights(seq_logps, stat_sums, counts)
        per_pair_loss, _, _ = pair_values(preference, seq_logps, counts, ref_logps, hard,
                                          gamma, weights, config, triton)
        ctx.gradients = (dhidden.view_as(hidden), dweight, dbias)
        weighted = preference if weighted_sums is not None else seq_logps.new_empty(0)
        stat_out = stat_sums if config.needs_stats else stat_sums.new_empty(0)
        ctx.mark_non_differentiable(per_pair_loss, seq_logps, weighted, stat_out)
        return per_pair_loss.mean(), per_pair_loss, seq_logps, weighted, stat_out

    @staticmethod
    def backward(ctx, grad_loss, *_):
        if ctx.gradients is None:
            raise RuntimeError("the one-pass logit-free loss can run backward once "
                               "(use passes=2 to backward through it again)")
        dhidden, dweight, dbias = ctx.gradients
        ctx.gradients = None
        grads = [None if grad is None or not needed else grad.mul_(grad_loss.to(grad.dtype))
                 for grad, needed in zip((dhidden, dweight, dbias), ctx.needs_input_grad)]
        return tuple(grads) + (None,) * 12
