"""Public loss API: the functional front ends over `mixpo.functions`.

    preference_loss(logits, labels, ...)          fused loss over materialised logits
    linear_preference_loss(hidden, weight, ...)   logit-free: no [tokens x vocab] logits ever
    sequence_logps(hidden, weight, labels, ...)   forward-only summed log-probs (reference models)

Each front end checks its tensors (`mixpo.checks`: ValueError naming the argument), builds one
frozen `LossConfig` from its keywords, runs stage 1 (sequence log-probs) and hands the result
to the shared per-pair head (stage 2). `backend="triton"` runs `mixpo.kernels`, `"torch"`
their torch twins (the CPU path and the test oracle), `"auto"` picks triton for CUDA tensors
(`mixpo.kernels.dispatch`).
"""
from __future__ import annotations

from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Optional

import torch

from mixpo.checks import (FLOAT_DTYPES, check_finite_logps, check_float_tensor, check_hard,
                          check_labels, check_linear_inputs, check_pair_count, pair_vector)
from mixpo.functions import (compact_rows, ld_row_weights, ld_token_weights,
                             linear_one_pass_loss, linear_sequence_logps, logits_sequence_logps,
                             pair_head as run_pair_head, plan_linear_passes, wpo_weights)
from mixpo.kernels.dispatch import tracing, use_triton
from mixpo.loss_config import LossConfig, loss_config_and_gamma, with_loss_options
from mixpo.loss_spec import MARGIN, sequence_rewards
from mixpo.loss_spec import shift_labels as _shift_labels
from mixpo.margins import AdaptiveMargin


@dataclass
class PreferenceLossOutput:
    """Result of a preference loss. `loss` is differentiable; every other field is detached.

    loss: scalar, the mean of per_pair_loss over pairs.
    per_pair_loss [B]; chosen_logps / rejected_logps [B]: summed completion log-probs (LD-DPO
    weighted with ld_alpha, as TRL); chosen_rewards / rejected_rewards [B]:
    beta * (logp - ref), summed as TRL reports them (per token for simpo, orpo and
    average_log_prob=True); gamma [B]: the target margin each pair used; hard [B] bool or
    None; chosen_counts / rejected_counts [B]: completion tokens; with token_metrics (or
    use_weighting): chosen_token_sums / rejected_token_sums [B, 4], each response's sums over
    its completion tokens of (mean logit, entropy, log sum p^2, label is the argmax).
    """
    loss: torch.Tensor
    per_pair_loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    gamma: torch.Tensor
    hard: Optional[torch.Tensor] = None
    chosen_counts: Optional[torch.Tensor] = None
    rejected_counts: Optional[torch.Tensor] = None
    chosen_token_sums: Optional[torch.Tensor] = None
    rejected_token_sums: Optional[torch.Tensor] = None

    def per_pair(self, transform) -> "PreferenceLossOutput":
        """This output with `transform` applied to every per-pair field (e.g. a gather over
        processes, before `metrics()`: one definition of the metrics for every front door);
        `loss` is kept, the routing flags travel as floats."""
        values = {}
        for item in dataclass_fields(self):
            value = getattr(self, item.name)
            if item.name != "loss" and value is not None:
                value = transform(value.float() if value.dtype == torch.bool else value)
            values[item.name] = value
        return PreferenceLossOutput(**values)

    def metric_tensors(self) -> dict:
        """The metrics as 0-d tensors on the loss's device (no host sync)."""
        margins = self.chosen_rewards - self.rejected_rewards
        stats = {
            "loss": self.loss.detach(),
            "rewards/chosen": self.chosen_rewards.mean(),
            "rewards/rejected": self.rejected_rewards.mean(),
            "rewards/accuracies": (margins > 0).float().mean(),
            "rewards/margins": margins.mean(),
            "logps/chosen": self.chosen_logps.mean(),
            "logps/rejected": self.rejected_logps.mean(),
            "gamma/mean": self.gamma.mean(),
            "gamma/std": self.gamma.std(unbiased=False),
            "routing/sft_fraction": self.gamma.new_zeros(()) if self.hard is None
            else self.hard.float().mean(),
        }
        if self.chosen_token_sums is not None:
            # TRL's definitions: token-weighted means over completion tokens.
            chosen_tokens, rejected_tokens = self.chosen_counts.sum(), self.rejected_counts.sum()
            chosen, rejected = self.chosen_token_sums.sum(0), self.rejected_token_sums.sum(0)
            stats["logits/chosen"] = chosen[0] / chosen_tokens
            stats["logits/rejected"] = rejected[0] / rejected_tokens
            stats["entropy"] = (chosen[1] + rejected[1]) / (chosen_tokens + rejected_tokens)
            stats["mean_token_accuracy"] = chosen[3] / chosen_tokens
        return stats

    def metrics(self) -> dict:
        """TRL-named scalar metrics plus gamma and routing statistics (floats; one host
        sync): loss, rewards/*, logps/*, gamma/*, routing/sft_fraction and, with token
        metrics, logits/chosen, logits/rejected, entropy and mean_token_accuracy."""
        tensors = self.metric_tensors()
        values = torch.stack([value.float() for value in tensors.values()]).tolist()
        return dict(zip(tensors, values))


# ----------------------------------------------------------------------------------------------
# Stage 2, shared by both front ends
# ----------------------------------------------------------------------------------------------
def _pair_gamma(config, gamma, margin, logps, counts, ref_logps, num_pairs):
    """The [B] target margins: `margin`'s adaptive solve, a per-pair tensor, or the fixed
    `config.gamma`."""
    explicit_gamma = gamma is not None or config.gamma not in (None, 0.0)
    if (margin is not None or explicit_gamma) and not config.has_margin:
        raise ValueError(f"gamma / margin apply to the margin loss types (sigmoid, ipo, simpo, "
                         f"...), not to loss_type={config.loss_type!r}")
    if margin is None:
        if gamma is None:
            return logps.new_full((num_pairs,), config.fixed_gamma)
        return pair_vector("gamma", gamma, num_pairs, logps.device)
    if not isinstance(margin, AdaptiveMargin):
        raise ValueError("margin must be a mixpo.AdaptiveMargin")
    if explicit_gamma:
        raise ValueError("pass either gamma or margin, not both")
    # gamma-PO's reward gaps: beta * h of the (first) margin type, per token when it is.
    margin_type = next(spec for spec, _ in config.types if spec.family == MARGIN)
    rewards, _ = sequence_rewards(logps.detach(), counts, ref_logps, config.beta,
                                  config.normalized(margin_type))
    return margin(rewards[:num_pairs] - rewards[num_pairs:])


def _pair_checks(config, ref_logps, hard, num_pairs, device, validate):
    """The per-pair inputs checked (`validate`) or detached: (ref_logps [2B] or None, hard
    [B] or None)."""
    if config.reference_free and ref_logps is not None:
        raise ValueError(f"ref_logps must be None for loss_type={config.loss_type!r} "
                         "(reference-free)")
    if validate:
        if ref_logps is not None:
            ref_logps = pair_vector("ref_logps", ref_logps, 2 * num_pairs, device)
        hard = check_hard(hard, num_pairs, device)
    elif ref_logps is not None:
        ref_logps = ref_logps.detach().float()
    if hard is not None and config.sorted_types:
        raise ValueError("hard (MixDPO routing) is not defined for aot / aot_unpaired, whose "
                         "losses belong to sorted positions, not to pairs")
    return ref_logps, hard


def _pair_output(loss, per_pair_loss, preference_logps, counts, ref_logps, hard, gamma,
                 stat_sums, config) -> PreferenceLossOutput:
    num_pairs = per_pair_loss.shape[0]
    detached = preference_logps.detach()
    rewards, _ = sequence_rewards(detached, counts, ref_logps, config.beta,
                                  config.reward_normalized)
    token_sums = None if stat_sums is None else stat_sums.T      # [2B, 4]
    return PreferenceLossOutput(
        loss=loss, per_pair_loss=per_pair_loss, chosen_logps=detached[:num_pairs],
        rejected_logps=detached[num_pairs:], chosen_rewards=rewards[:num_pairs],
        rejected_rewards=rewards[num_pairs:], gamma=gamma, hard=hard,
        chosen_counts=counts[:num_pairs], rejected_counts=counts[num_pairs:],
        chosen_token_sums=None if token_sums is None else token_sums[:num_pairs],
        rejected_token_sums=None if token_sums is None else token_sums[num_pairs:])


def pair_head(seq_logps, counts, config: LossConfig, *, weighted_logps=None, stat_sums=None,
              ref_logps=None, hard=None, gamma=None, margin=None, backend="auto",
              inputs=None, validate=True) -> PreferenceLossOutput:
    """Stage 2 on summed sequence log-probs [2B] (differentiable) and completion counts [2B]:
    checks the per-pair inputs, resolves gamma, runs the epilogue, builds the output.
    `weighted_logps` [2B] are LD-DPO's weighted sums (the preference term's log-probs),
    `stat_sums` [4, 2B] the per-sequence sums of the per-token statistics; `inputs` names
    the tensors to blame for non-finite log-probs. `validate=False` skips the checks that
    read tensor values on the host (non-finite inputs then surface as a non-finite loss), as
    tracing does (fake tensors, torch.compile). `backend` is accepted for the callers' sake:
    the head is plain torch on [B]-sized data on every backend."""
    device, num_pairs = seq_logps.device, seq_logps.shape[0] // 2
    if validate:      # the checks skip what they cannot read while tracing
        check_finite_logps(seq_logps, inputs or {})
    ref_logps, hard = _pair_checks(config, ref_logps, hard, num_pairs, device, validate)
    preference_logps = seq_logps if weighted_logps is None else weighted_logps
    gamma = _pair_gamma(config, gamma, margin, preference_logps, counts, ref_logps, num_pairs)
    weights = wpo_weights(seq_logps, stat_sums, counts) if config.use_weighting else None
    loss, per_pair_loss = run_pair_head(preference_logps, seq_logps, counts, ref_logps, hard,
                                        gamma, weights, config)
    return _pair_output(loss, per_pair_loss, preference_logps, counts, ref_logps, hard, gamma,
                        stat_sums, config)


def _token_weight(config: LossConfig, labels):
    """LD-DPO's per-position weights, or None."""
    if config.ld_alpha is None:
        return None
    return ld_token_weights(labels, config.ignore_index, config.ld_alpha)


# ----------------------------------------------------------------------------------------------
# Front ends with a LossConfig (what the modules call)
# ----------------------------------------------------------------------------------------------
def logits_loss(logits, labels, config: LossConfig, *, ref_logps=None, hard=None, gamma=None,
                margin=None, backend="auto", inplace_backward=False):
    """`preference_loss` with its hyper-parameters as one LossConfig."""
    check_pair_count("logits", logits, "V")
    check_float_tensor("logits", logits, logits.device)
    if logits.stride(-1) != 1:
        raise ValueError("logits must be contiguous in its last (vocab) dimension")
    labels, counts = check_labels(labels, logits.shape[:2], logits.shape[2],
                                  config.ignore_index, logits.device, "logits")
    token_weight = _token_weight(config, labels)
    seq_logps, weighted, stat_sums = logits_sequence_logps(
        logits, labels, token_weight, config, use_triton(backend, logits), inplace_backward)
    return pair_head(seq_logps, counts, config, weighted_logps=weighted, stat_sums=stat_sums,
                     ref_logps=ref_logps, hard=hard, gamma=gamma, margin=margin,
                     backend=backend, inputs={"logits": logits})


def autocast_head_inputs(hidden, weight, bias):
    """Under `torch.autocast`, hidden, weight and bias in the autocast dtype, as `F.linear`
    (so a model's own LM head, and trl's fused head) would compute the logits: a body with
    fp32 weights ends in an fp32 norm, and without this cast the head would run in fp32. The
    casts are differentiable (fp32 gradients reach fp32 parameters). Outside autocast the
    tensors are returned as they are."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(tensor):   # autocast's eligible dtypes only: fp64 stays (and is refused later)
        if tensor is None or tensor.dtype == dtype or tensor.dtype not in FLOAT_DTYPES:
            return tensor
        return tensor.to(dtype)

    return cast(hidden), cast(weight), cast(bias)


def _completion_rows(labels, config, completion_rows, completion_sequences, counts, device):
    """(rows [n], sequences [n], LD-DPO row weights [n] or None, static) of the completion
    tokens: given (the collators'), or found here (`compact_rows`; `static`: its upper bound
    under tracing, every position)."""
    static = completion_rows is None and tracing(labels)
    if completion_rows is None:
        rows, sequences = compact_rows(labels, config.ignore_index)
    else:
        rows = completion_rows.to(device)
        sequences = completion_sequences.to(device) if completion_sequences is not None \
            else torch.div(rows, labels.shape[-1], rounding_mode="floor")
    row_weight = None
    if config.ld_alpha is not None:
        row_weight = ld_token_weights(labels, config.ignore_index, config.ld_alpha) \
            .reshape(-1) if static else ld_row_weights(counts, sequences, config.ld_alpha)
    return rows, sequences, row_weight, static


def _linear_stage_one(hidden, weight, bias, labels, config, backend, rows, sequences,
                      row_weight, counts, workspace_bytes=None):
    """Stage 1 of the logit-free path (two passes): the sequence log-probs."""
    return linear_sequence_logps(hidden, weight, bias, labels, rows, sequences,
                                 counts.shape[0], row_weight, config,
                                 use_triton(backend, hidden), workspace_bytes)


def _linear_one_pass(hidden, weight, bias, labels, config, groups, rows, sequences, row_weight,
                     counts, *, ref_logps, hard, gamma, backend, inputs, validate,
                     workspace_bytes=None):
    """Both stages of the logit-free path in one pass (`linear_one_pass_loss`)."""
    num_pairs = counts.shape[0] // 2
    ref_logps, hard = _pair_checks(config, ref_logps, hard, num_pairs, hidden.device, validate)
    gamma = _pair_gamma(config, gamma, None, counts, counts, ref_logps, num_pairs)
    loss, per_pair_loss, seq_logps, weighted, stat_sums = linear_one_pass_loss(
        hidden, weight, bias, labels, rows, sequences, row_weight, counts, ref_logps, hard,
        gamma, config, use_triton(backend, hidden), groups, workspace_bytes)
    if validate:
        check_finite_logps(seq_logps, inputs)
    preference_logps = weighted if weighted is not None else seq_logps
    return _pair_output(loss, per_pair_loss, preference_logps, counts, ref_logps, hard, gamma,
                        stat_sums, config)


def _check_workspace(workspace_bytes):
    if workspace_bytes is not None and (isinstance(workspace_bytes, bool) or not isinstance(
            workspace_bytes, int) or workspace_bytes <= 0):
        raise ValueError(f"workspace_bytes must be a positive int or None, "
                         f"got {workspace_bytes!r}")


def linear_loss(hidden, weight, labels, config: LossConfig, *, bias=None, ref_logps=None,
                hard=None, gamma=None, margin=None, backend="auto", completion_rows=None,
                completion_sequences=None, completion_counts=None, validate=True,
                workspace_bytes=None, passes="auto"):
    """`linear_preference_loss` with its hyper-parameters as one LossConfig.

    The training fast path: `completion_rows` [n] (flat indices of the positions whose label
    is not ignore_index) and `completion_counts` [2B], computed on the CPU batch, and
    `validate=False` (inputs checked by the caller) keep the call free of host syncs (but
    for one read of the counts when fp32 weights could take the one pass in groups: a batch
    larger than the workspace). The call also runs on fake tensors and under torch.compile
    (`mixpo.kernels.ops`).
    Padding-free batches: hidden [1, L, H] and labels [1, L] hold every sequence packed in
    one row; `completion_sequences` [n] then names the sequence of each completion row and
    `completion_counts` [2B] the sequences' lengths in completion tokens. Under
    torch.autocast the head runs in the autocast dtype (`autocast_head_inputs`).
    workspace_bytes, passes: see `linear_preference_loss`."""
    _check_workspace(workspace_bytes)
    hidden, weight, bias = autocast_head_inputs(hidden, weight, bias)
    packed = completion_sequences is not None
    if validate and not packed:
        labels, counts = check_linear_inputs(hidden, weight, bias, labels, config.ignore_index,
                                             True)
    else:
        counts = completion_counts.to(hidden.device, torch.float32) \
            if completion_counts is not None \
            else (labels != config.ignore_index).sum(dim=1).float()
    rows, sequences, row_weight, static = _completion_rows(
        labels, config, completion_rows, completion_sequences, counts, hidden.device)
    inputs = {"hidden": hidden, "weight": weight, "bias": bias}
    # One pass computes gradients in the forward: only worth it when a backward follows
    # (and it needs rows ordered by sequence: not the static bound of the compaction).
    training = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (hidden, weight, bias))
    groups = plan_linear_passes(config, margin, passes if training and not static else 2,
                                weight, rows.shape[0], sequences, counts, workspace_bytes,
                                use_triton(backend, hidden))
    if groups is not None:
        return _linear_one_pass(hidden, weight, bias, labels, config, groups, rows, sequences,
                                row_weight, counts, ref_logps=ref_logps, hard=hard,
                                gamma=gamma, backend=backend, inputs=inputs,
                                validate=validate, workspace_bytes=workspace_bytes)
    seq_logps, weighted, stat_sums = _linear_stage_one(
        hidden, weight, bias, labels, config, backend, rows, sequences, row_weight, counts,
        workspace_bytes)
    return pair_head(seq_logps, counts, config, weighted_logps=weighted, stat_sums=stat_sums,
                     ref_logps=ref_logps, hard=hard, gamma=gamma, margin=margin,
                     backend=backend, inputs=inputs, validate=validate)


# ----------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------
@with_loss_options
def preference_loss(logits, labels, *, ref_logps=None, hard=None, margin=None, backend="auto",
                    inplace_backward=False, **options):
    """Fused preference loss over LM-head logits: one read of the logits in forward.

    Args:
        logits: [2B, T, V] fp32/bf16/fp16 (last dim contiguous); rows 0..B-1 are the chosen
            responses, rows B..2B-1 the rejected responses of the same pairs.
        labels: [2B, T] integer, aligned with positions (`labels[i, t]` is the token whose
            log-prob is read at position t; see `shift_labels`); `ignore_index` marks prompt
            and padding. Every sequence needs at least one completion token.
        ref_logps: [2B] summed reference log-probs, or None for a reference-free loss.
        hard: [B] bool, MixDPO routing: these pairs take the token-mean NLL of the chosen
            response instead (their rejected response gets no gradient).
        margin: a `mixpo.AdaptiveMargin` (gamma-PO): it receives the batch's reward gaps and
            supplies a per-pair gamma (exclusive with a gamma tensor).
        backend: "auto" (Triton on CUDA tensors) | "triton" | "torch".
        inplace_backward: the backward writes d loss / d logits into `logits` itself
            (flash-attention style): no second [N, V] buffer, and `logits` is consumed.
    {loss keywords}
    Returns a `PreferenceLossOutput`; only `.loss` carries gradient (to `logits`).
    """
    config, gamma = loss_config_and_gamma(options)
    return logits_loss(logits, labels, config, ref_logps=ref_logps, hard=hard, gamma=gamma,
                       margin=margin, backend=backend, inplace_backward=inplace_backward)


@with_loss_options
def linear_preference_loss(hidden, weight, labels, *, bias=None, ref_logps=None, hard=None,
                           margin=None, backend="auto", workspace_bytes=None, passes="auto",
                           **options):
    """Logit-free fused preference loss: the [tokens x vocab] logits never exist.

    hidden [2B, T, H] (the model body's last hidden states, chosen rows first), weight [V, H]
    (lm_head weight, possibly tied to the embedding), bias [V] or None, labels [2B, T],
    ref_logps, hard, margin and backend as in `preference_loss`. Prompt and padding tokens
    (labels == ignore_index) are compacted away before any matmul. Gradients flow to hidden,
    weight and bias. Under torch.autocast the head computes in the autocast dtype, as
    `F.linear` would (the model's own head, trl's fused head), whatever the dtype of the
    body's output.
    Head keywords:
        workspace_bytes: the most bytes of logits / softmax gradient alive at once (default
            `mixpo.kernels.configs.DEFAULT_WORKSPACE_BYTES`, 256 MiB): the backward's
            per-vocab-chunk gradient [n, C], the torch backend's logits chunks, the one-pass
            groups' fp32 logits. Bigger: fewer, larger GEMMs and one pass for more batches.
        passes: "auto" (one pass -- forward and exact gradient together, 6nVH FLOPs instead
            of 8nVH, plus 2VH per token of a pair larger than the workspace, whose logits
            before its last workspace block are recomputed -- when every pair's gradient
            coefficient depends on that pair alone and, for 16-bit weights, the whole
            batch's logits fit the workspace; logged once, see
            `mixpo.functions.plan_linear_passes`), 1 (force; needs a per-pair loss) or 2
            (forward, then a backward that recomputes all the logits).
    {loss keywords}
    Returns a `PreferenceLossOutput`; only `.loss` carries gradient.
    """
    config, gamma = loss_config_and_gamma(options)
    return linear_loss(hidden, weight, labels, config, bias=bias, ref_logps=ref_logps,
                       hard=hard, gamma=gamma, margin=margin, backend=backend,
                       workspace_bytes=workspace_bytes, passes=passes)


@torch.no_grad()
def sequence_logps(hidden, weight, labels, *, bias=None, average=False, ld_alpha=None,
                   logit_scale=1.0, softcap=None, ignore_index=-100, backend="auto",
                   completion_rows=None, completion_sequences=None, completion_counts=None,
                   workspace_bytes=None):
    """Summed (or, with average=True, token-mean) completion log-probs per sequence, [S] fp32.

    Forward only and logit-free: for reference models and for precomputing reference
    log-probs over a dataset. hidden [S, T, H] (any S; with `ld_alpha`, the 2B rows of pairs
    as the loss takes them, and their LD-DPO weighted sums are returned), weight [V, H],
    labels [S, T]; logit_scale / softcap as in `linear_preference_loss`; the completion_*
    tensors as in `mixpo.losses.linear_loss` (packed batches, no host sync); workspace_bytes
    as in `linear_preference_loss` (the torch backend's logits chunks). Under torch.autocast
    the head runs in the autocast dtype, as `F.linear` would.
    """
    _check_workspace(workspace_bytes)
    hidden, weight, bias = autocast_head_inputs(hidden, weight, bias)
    config = LossConfig(ld_alpha=ld_alpha, logit_scale=logit_scale, softcap=softcap,
                        ignore_index=ignore_index)
    if completion_rows is None:
        labels, counts = check_linear_inputs(hidden, weight, bias, labels, ignore_index,
                                             ld_alpha is not None)
    else:
        counts = completion_counts.to(hidden.device, torch.float32)
    rows, sequences, row_weight, _ = _completion_rows(
        labels, config, completion_rows, completion_sequences, counts, hidden.device)
    seq_logps, weighted, _ = _linear_stage_one(hidden, weight, bias, labels, config, backend,
                                               rows, sequences, row_weight, counts,
                                               workspace_bytes)
    if completion_rows is None:
        check_finite_logps(seq_logps, {"hidden": hidden, "weight": weight, "bias": bias})
    if weighted is not None:
        seq_logps = weighted
    return seq_logps / counts if average else seq_logps


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """HF-style labels (label t = token t) -> position-aligned labels (label t = token t+1).

    The last position gets ignore_index, so logits[:, t] pairs with shifted[:, t].
    """
    if not isinstance(labels, torch.Tensor) or labels.ndim != 2:
        raise ValueError(f"labels must be a [S, T] tensor, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else labels!r}")
    return _shift_labels(labels, ignore_index)
