"""The execution of the loss: two stages over custom ops (`mixpo.kernels.ops`), so that
either front end feeds the same per-pair head and every part runs on fake tensors and under
`torch.compile` without graph breaks.

1. summed completion log-prob of every sequence, [S] fp32:
   - `logits_sequence_logps`: from materialised logits [S, T, V] (one read in forward, one
     read + write in backward, optionally in place);
   - `linear_sequence_logps`: from hidden states and the LM-head weight, never materialising
     logits (the logit-free path; only the completion rows are computed);
   both apply the logit transform (logit_scale, softcap), optionally also return the
   LD-DPO-weighted sums and per-sequence sums of the per-token statistics (mean logit,
   entropy, log sum p^2, label-is-argmax) from the same pass;
2. the per-pair head: `mixpo.kernels.pair_loss.per_pair_loss` on [B]-sized data (every loss
   type, target margins, MixDPO routing, NLL terms, WPO weights), differentiated by
   autograd; its gradient reaches stage 1 as one coefficient per token.
`linear_one_pass` fuses both stages of the logit-free path when every pair's gradient
coefficient depends on that pair only (`plan_linear_passes` decides): one pass over groups of
whole pairs computes the loss and its exact gradient (the head's by autograd, inside the op),
6nVH FLOPs instead of 8nVH, plus 2VH per token recomputed where a pair's logits exceed the
workspace (`mixpo.kernels.linear_one_pass`).

`triton` (a bool, from `mixpo.kernels.dispatch.use_triton`) selects the Triton kernels or
their torch twins. No argument checking here: `mixpo.losses` does it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from typing import Optional

import torch
from torch import Tensor

from mixpo.kernels import linear_one_pass as one_pass_kernels
from mixpo.kernels import ops, pair_loss
from mixpo.kernels.dispatch import kernel_ops, tracing
from mixpo.kernels.linear_logps_torch import Workspace
from mixpo.kernels.logits_logps_torch import STAT_NAMES
from mixpo.loss_config import LossConfig

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


def compact_rows(labels: torch.Tensor, ignore_index: int):
    """(rows, sequences): flat indices into [S * T] of the positions with a label, and the
    sequence each belongs to (`torch.nonzero`: one host sync; the trainer's collator computes
    both on the CPU instead). On fake tensors and under torch.compile (no data-dependent
    shapes) the compaction has its static upper bound: every position, the ignored ones
    assigned to sequence S, which no sum keeps."""
    flat = labels.reshape(-1)
    if tracing(labels):
        rows = torch.arange(flat.shape[0], device=labels.device)
        sequences = torch.div(rows, labels.shape[-1], rounding_mode="floor")
        return rows, torch.where(flat != ignore_index, sequences, labels.shape[0])
    rows = torch.nonzero(flat != ignore_index).squeeze(1)
    return rows, torch.div(rows, labels.shape[-1], rounding_mode="floor")


def _sequence_sums(values: Tensor, sequences: Tensor, num_seqs: int) -> Tensor:
    """Per-sequence sums [S] of per-row values [n] (fp32 out). Accumulated in fp64 ([n]
    values into [S]: nothing to pay): an fp32 index_add_ adds one token at a time, and at
    sums of about -5000 that drifts ~1e-3, ten times a pairwise fp32 sum. Rows of sequence S
    (`compact_rows`' static bound) land in a slot that is dropped."""
    sums = values.new_zeros(num_seqs + 1, dtype=torch.float64)
    return sums.index_add(0, sequences, values.double())[:num_seqs].float()


def _stat_sums(stats: Tensor, sequences: Tensor, num_seqs: int) -> Tensor:
    """[len(STAT_NAMES), S] per-sequence sums of per-row statistics [4, n]."""
    sums = stats.new_zeros(stats.shape[0], num_seqs + 1)
    return sums.index_add(1, sequences, stats)[:, :num_seqs]


# ----------------------------------------------------------------------------------------------
# Stage 1
# ----------------------------------------------------------------------------------------------
def logits_sequence_logps(logits, labels, token_weight, config, triton, inplace_backward):
    """(seq_logps [S], LD-weighted sums [S] or None, stat sums [4, S] or None) of logits
    [S, T, V]; differentiable w.r.t. the logits (`ops.logits_token_logps`)."""
    token_logps, _, stats = ops.logits_token_logps(
        logits, labels, config.ignore_index, config.logit_scale, config.softcap,
        config.needs_stats, inplace_backward, triton)
    weighted = None if token_weight is None else (token_logps * token_weight).sum(dim=1)
    stat_sums = stats.sum(dim=2) if config.needs_stats else None
    return token_logps.sum(dim=1), weighted, stat_sums


def linear_sequence_logps(hidden, weight, bias, labels, rows, sequences, num_seqs, row_weight,
                          config, triton, workspace_bytes=None):
    """(seq_logps [S], LD-weighted sums [S] or None, stat sums [4, S] or None) from hidden
    [..., H] (any leading shape: [S, T] padded or [1, L] packed), the completion rows [n]
    (flat indices into hidden's leading dimensions) and the sequence of each [n];
    differentiable w.r.t. hidden, weight and bias (`ops.linear_token_logps`)."""
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    row_labels = labels.reshape(-1)[rows]
    # Rows of `compact_rows`' static bound may be prompt or padding: any valid label there.
    row_labels = torch.where(sequences < num_seqs, row_labels, 0)
    token_logps, _, _, stats, _ = ops.linear_token_logps(
        hidden2d, weight, bias, row_labels, rows, config.logit_scale, config.softcap,
        config.needs_stats, workspace_bytes, triton)
    seq_logps = _sequence_sums(token_logps, sequences, num_seqs)
    weighted = None if row_weight is None else \
        _sequence_sums(token_logps * row_weight, sequences, num_seqs)
    stat_sums = _stat_sums(stats, sequences, num_seqs) if config.needs_stats else None
    return seq_logps, weighted, stat_sums


# ----------------------------------------------------------------------------------------------
# Stage 2
# ----------------------------------------------------------------------------------------------
def wpo_weights(seq_logps, stat_sums, counts):
    """WPO's per-pair weights [B] (detached): exp(mean_t[log p_t - log sum_v p_v^2]) of the
    chosen response times that of the rejected one (TRL's use_weighting)."""
    num_pairs = seq_logps.shape[0] // 2
    log_sum_sq = stat_sums[STAT_NAMES.index("log_sum_sq")]
    per_sequence = torch.exp((seq_logps.detach() - log_sum_sq) / counts)
    return per_sequence[:num_pairs] * per_sequence[num_pairs:]


def pair_head(preference_logps, nll_logps, counts, ref_logps, hard, gamma, weights, config):
    """(loss, per_pair_loss [B] detached): the one per-pair definition
    (`mixpo.kernels.pair_loss`), differentiable w.r.t. both log-prob inputs [2B]."""
    per_pair = pair_loss.per_pair_loss(preference_logps, nll_logps, counts, ref_logps, hard,
                                       gamma, weights, config)
    return per_pair.mean(), per_pair.detach()


# ----------------------------------------------------------------------------------------------
# One pass: the logit-free loss and its exact gradient together
# ----------------------------------------------------------------------------------------------
_LOGGED: set = set()


def _log_once(message: str) -> None:
    if not torch.compiler.is_compiling() and message not in _LOGGED:
        _LOGGED.add(message)
        logger.info(message)


def plan_linear_passes(config, margin, passes, weight, num_tokens: int, sequences, counts,
                       workspace_bytes=None, triton: bool = False):
    """One pass or two for the logit-free loss: None (two passes: forward, then a backward
    that recomputes the logits) or the one-pass groups, a list of (pair indices [k], token
    indices [t]) in pair order. The choice is logged once per distinct reason.

    One pass needs (1) every pair's gradient coefficient to depend on that pair only: not
    AOT's sorted losses nor an adaptive margin (gamma-PO's solve couples the batch); TRL's
    batch NLL normalisation only needs the batch's chosen-token count, known before the
    pass; (2) for 16-bit weights, the whole batch's fp32 logits [t, V] in the workspace
    (`workspace_bytes`; more would accumulate dWeight in fp32 [V, H], which the two-pass
    backward never holds). With fp32 weights pairs are grouped to fit the workspace and a
    pair larger than it recomputes the logits of its tokens before its last workspace
    block (`mixpo.kernels.linear_one_pass`): (6 + 2r) nVH FLOPs for a recomputed share r,
    never more than two passes' 8nVH, in the same memory. passes=1 forces one pass where
    (1) holds (16-bit weights: groups of pairs, recomputation and the fp32 dWeight
    accumulator as needed); passes=2 forces two.
    `counts` [2B] are the sequences' completion-token counts, read on the host (one sync)
    when the batch does not fit one group. On fake tensors nothing is read: one pass only
    when the whole batch fits one group. `triton`: the backend (the torch backend's general
    path holds temporaries beside a block: `linear_one_pass.block_tokens_in`). Under
    torch.compile, two passes (the one pass's op
    takes the loss's options as a string, which a config built inside the compiled code
    cannot give).
    """
    if passes not in PASSES:
        raise ValueError(f"passes must be one of {PASSES}, got {passes!r}")
    if passes == 2:
        return None
    if torch.compiler.is_compiling():
        if passes == 1:
            raise ValueError("passes=1 runs eagerly (or on fake tensors), not under "
                             "torch.compile: use passes='auto' or 2")
        return None
    coupled = "aot / aot_unpaired sort the batch" if config.sorted_types else \
        "an adaptive margin solves over the batch" if margin is not None else None
    if coupled:
        if passes == 1:
            raise ValueError(f"passes=1 needs per-pair gradient coefficients: {coupled}")
        _log_once(f"mixpo: logit-free loss in two passes ({coupled})")
        return None
    vocab_size, forced = weight.shape[0], passes == 1
    capacity = one_pass_kernels.block_tokens_in(workspace_bytes, vocab_size, config.logit_scale,
                                                config.softcap, config.needs_stats, triton)
    if num_tokens <= capacity:
        _log_once(f"mixpo: logit-free loss in one pass ({'forced' if forced else 'per-pair loss'}"
                  ", 1 group(s) of pairs in the workspace)")
        num_pairs = counts.shape[0] // 2
        return [(torch.arange(num_pairs, device=sequences.device),
                 torch.arange(num_tokens, device=sequences.device))]
    if weight.dtype != torch.float32 and not forced:
        _log_once(f"mixpo: logit-free loss in two passes (the batch's {num_tokens} tokens x "
                  f"{vocab_size} fp32 logits exceed the workspace: one pass with 16-bit "
                  "weights would accumulate dWeight in fp32 [V, H])")
        return None
    if tracing(counts, sequences):
        if forced:
            raise ValueError("passes=1 with a batch larger than the workspace groups its "
                             "pairs by their lengths, read on the host: not on fake tensors "
                             "or under torch.compile (use passes='auto' or a larger "
                             "workspace_bytes)")
        _log_once("mixpo: logit-free loss in two passes (the batch exceeds the workspace; "
                  "grouping pairs needs their lengths on the host)")
        return None
    return _pair_groups(counts, sequences, capacity, forced)


def _pair_groups(counts, sequences, capacity, forced):
    """Groups of consecutive whole pairs whose tokens fit `capacity` (one sync: counts); a
    pair larger than that is a group of its own."""
    seq_counts = [int(count) for count in counts.tolist()]
    num_pairs = len(seq_counts) // 2
    pair_tokens = [seq_counts[i] + seq_counts[num_pairs + i] for i in range(num_pairs)]
    pair_groups, current, size = [], [], 0
    for pair, tokens in enumerate(pair_tokens):
        if current and size + tokens > capacity:
            pair_groups.append(current)
            current, size = [], 0
        current.append(pair)
        size += tokens
    pair_groups.append(current)
    recomputed = one_pass_kernels.recomputed_tokens(
        [sum(pair_tokens[pair] for pair in pairs) for pairs in pair_groups], capacity)
    _log_once(f"mixpo: logit-free loss in one pass ({'forced' if forced else 'per-pair loss'},"
              f" {len(pair_groups)} group(s) of pairs"
              + (f"; pairs larger than the workspace recompute {recomputed} of "
                 f"{sum(pair_tokens)} tokens' logits)" if recomputed else ")"))
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


def config_json(config: LossConfig) -> str:
    """A LossConfig as the string a custom op takes (its fields, JSON)."""
    return json.dumps({item.name: getattr(config, item.name)
                       for item in dataclasses.fields(config)})


@functools.lru_cache(maxsize=64)
def _config(text: str) -> LossConfig:
    return LossConfig(**json.loads(text))


_AUTOGRAD_KEYS = ("AutogradFunctionality", "ADInplaceOrView", "AutogradOther",
                  "AutogradNestedTensor")


@contextlib.contextmanager
def _autograd_inside_op():
    """Autograd inside a custom op's implementation, which the dispatcher runs below the
    autograd keys: they are taken out of the thread's exclude set for the [B]-sized head
    (torch.func.grad there fails under any active dispatch mode, e.g. a memory tracker)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for name in _AUTOGRAD_KEYS:
        exclude = exclude.remove(getattr(torch._C.DispatchKey, name))
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), \
            torch.enable_grad():
        yield


def _head_gradients(objective, *inputs):
    """d objective(*inputs) / d each input (zeros where it does not depend on one)."""
    with _autograd_inside_op():
        leaves = [tensor.detach().requires_grad_() for tensor in inputs]
        value = objective(*leaves)
        if not value.requires_grad:
            return [torch.zeros_like(tensor) for tensor in inputs]
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return [torch.zeros_like(tensor) if grad is None else grad
            for grad, tensor in zip(grads, inputs)]


def _one_pass_layout(token_groups, block_tokens: int, weight, weight_grad: bool) -> tuple:
    """`one_pass_layout` of these groups: blocks of at most `block_tokens`."""
    sizes = [tokens.shape[0] for tokens in token_groups]
    block_tokens, accumulate = one_pass_kernels.blocks(sizes, block_tokens)
    return one_pass_kernels.one_pass_layout(block_tokens, weight.shape[0], weight.shape[1],
                                            weight.dtype, accumulate, weight_grad)


def _one_pass_outputs(hidden, weight, bias, counts, config, weighted: bool, weight_grad: bool):
    """(loss, per_pair_loss, seq_logps, weighted, stat_sums, dhidden, dweight, dbias) shapes
    of `linear_one_pass` (empty where absent)."""
    num_seqs = counts.shape[0]
    vector = lambda size: counts.new_empty(size, dtype=torch.float32)   # noqa: E731
    return (vector(()), vector(num_seqs // 2), vector(num_seqs),
            vector(num_seqs if weighted else 0),
            vector((len(STAT_NAMES) if config.needs_stats else 0, num_seqs)),
            torch.empty_like(hidden),
            torch.empty_like(weight) if weight_grad else weight.new_empty(0),
            weight.new_empty(0) if bias is None else torch.empty_like(bias))


@torch.library.custom_op("mixpo::linear_one_pass", mutates_args=())
def linear_one_pass(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                    rows: Tensor, sequences: Tensor, row_weight: Optional[Tensor],
                    counts: Tensor, ref_logps: Optional[Tensor], hard: Optional[Tensor],
                    gamma: Tensor, pair_groups: list[Tensor], token_groups: list[Tensor],
                    block_tokens: int, config: str, weight_grad: bool, triton: bool) -> tuple[
                        Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The logit-free loss with its exact gradient, in one pass over groups of whole pairs.

    hidden [N, H], weight [V, H], bias [V] or None; labels [n] (of the rows), rows [n],
    sequences [n], row_weight [n] (LD-DPO) or None, counts [2B]; ref_logps [2B], hard [B]
    or None, gamma [B]; pair_groups / token_groups: `plan_linear_passes`' groups;
    block_tokens: the most tokens whose fp32 logits the workspace holds; config:
    `config_json`. Returns (loss, per_pair_loss [B], seq_logps [2B], LD-weighted sums [2B] or
    empty, stat sums [4, 2B] or empty, dhidden [N, H], dweight [V, H] or empty, dbias [V] or
    empty, workspace): the gradients of `loss` w.r.t. hidden, weight and bias, computed as
    each group's logits exist (its coefficients: the head's gradient by autograd)."""
    config = _config(config)
    num_seqs, device = counts.shape[0], hidden.device
    num_pairs = num_seqs // 2
    chosen_tokens = counts[:num_pairs].sum()
    seq_sums = torch.zeros(num_seqs, dtype=torch.float64, device=device)
    weighted_sums = torch.zeros_like(seq_sums) if row_weight is not None else None
    stat_sums = torch.zeros(len(STAT_NAMES), num_seqs, dtype=torch.float32, device=device)

    def objective(preference, logps, members, pairs, weights):
        return pair_loss.group_objective(
            preference, logps, counts[members],
            None if ref_logps is None else ref_logps[members],
            None if hard is None else hard[pairs], gamma[pairs], weights, config, num_pairs,
            chosen_tokens)

    def coefficients(position, token_logps, aux):
        pairs, tokens = pair_groups[position], token_groups[position]
        seqs = sequences[tokens]
        members = torch.cat([pairs, pairs + num_pairs])
        seq_sums.index_add_(0, seqs, token_logps.double())
        logps = seq_sums[members].float()
        if config.needs_stats:
            stat_sums.index_add_(1, seqs, torch.stack([aux[name] for name in STAT_NAMES]))
        weights = wpo_weights(logps, stat_sums[:, members], counts[members]) \
            if config.use_weighting else None
        coef_plain = torch.zeros(num_seqs, dtype=torch.float32, device=device)
        if weighted_sums is None:
            coef_plain[members], = _head_gradients(
                lambda x: objective(x, x, members, pairs, weights), logps)
            return coef_plain[seqs]
        weighted_sums.index_add_(0, seqs, (token_logps * row_weight[tokens]).double())
        d_pref, d_nll = _head_gradients(
            lambda pref, nll: objective(pref, nll, members, pairs, weights),
            weighted_sums[members].float(), logps)
        coef_weighted = torch.zeros_like(coef_plain)
        coef_plain[members], coef_weighted[members] = d_nll, d_pref
        return coef_plain[seqs] + coef_weighted[seqs] * row_weight[tokens]

    workspace = Workspace(_one_pass_layout(token_groups, block_tokens, weight, weight_grad),
                          device)
    group_ops = kernel_ops("linear_logps", True).TritonGroupOps if triton \
        else one_pass_kernels.TorchGroupOps
    with ops.no_autocast(hidden):
        _, _, _, dhidden, dweight, dbias = one_pass_kernels.linear_token_logps_one_pass(
            hidden, weight, bias, labels, rows, token_groups, coefficients, block_tokens,
            config.logit_scale, config.softcap, config.needs_stats, weight_grad=weight_grad,
            ops=group_ops, workspace=workspace)
    seq_logps = seq_sums.float()
    preference = seq_logps if weighted_sums is None else weighted_sums.float()
    weights = wpo_weights(seq_logps, stat_sums, counts) if config.use_weighting else None
    loss, per_pair = pair_head(preference, seq_logps, counts, ref_logps, hard, gamma, weights,
                               config)
    return (loss, per_pair, seq_logps,
            seq_logps.new_empty(0) if weighted_sums is None else preference,
            stat_sums if config.needs_stats else seq_logps.new_empty(0, num_seqs), dhidden,
            weight.new_empty(0) if dweight is None else dweight,
            weight.new_empty(0) if dbias is None else dbias, workspace.buffer)


@linear_one_pass.register_fake
def _(hidden, weight, bias, labels, rows, sequences, row_weight, counts, ref_logps, hard, gamma,
      pair_groups, token_groups, block_tokens, config, weight_grad, triton):
    config = _config(config)
    layout = _one_pass_layout(token_groups, block_tokens, weight, weight_grad)
    return _one_pass_outputs(hidden, weight, bias, counts, config, row_weight is not None,
                             weight_grad) + (ops._empty_workspace(layout, hidden),)


def _one_pass_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[5:8])
    ctx.has_bias = inputs[2] is not None
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _one_pass_backward(ctx, grad_loss, *_):
    dhidden, dweight, dbias = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if grad_loss is None:
        grad_loss = dhidden.new_zeros(())
    pair_groups, token_groups = needs[11], needs[12]     # lists: one flag per tensor
    # Scaled in place: no second copy of the gradients (the saved tensors are then spent, so
    # a second backward raises).
    grads = [grad.mul_(grad_loss.to(grad.dtype)) if needed and grad.numel() else None
             for grad, needed in zip((dhidden, dweight, dbias), needs[:3])]
    if not ctx.has_bias:
        grads[2] = None
    return tuple(grads) + (None,) * 8 + ([None] * len(pair_groups),
                                         [None] * len(token_groups)) + (None,) * 4


linear_one_pass.register_autograd(_one_pass_backward, setup_context=_one_pass_setup)


def linear_one_pass_loss(hidden, weight, bias, labels, rows, sequences, row_weight, counts,
                         ref_logps, hard, gamma, config, triton, groups, workspace_bytes=None):
    """(loss, per_pair_loss [B], seq_logps [2B], weighted [2B] or None, stat sums [4, 2B] or
    None) of the one pass (`linear_one_pass`) over `plan_linear_passes`' groups within the
    `workspace_bytes` budget; only `loss` carries gradient."""
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    weight_grad = weight.requires_grad and torch.is_grad_enabled()
    loss, per_pair, seq_logps, weighted, stat_sums, *_ = linear_one_pass(
        hidden2d, weight, bias, labels.reshape(-1)[rows], rows, sequences, row_weight, counts,
        ref_logps, hard, gamma, [pairs for pairs, _ in groups],
        [tokens for _, tokens in groups],
        one_pass_kernels.block_tokens_in(workspace_bytes, weight.shape[0], config.logit_scale,
                                         config.softcap, config.needs_stats, triton),
        config_json(config), weight_grad, triton)
    return (loss, per_pair, seq_logps, weighted if row_weight is not None else None,
            stat_sums if config.needs_stats else None)
