"""The logit-free loss's one pass, for both backends: token log-probs and the exact gradient
of a per-pair loss together, never more fp32 logits alive than one block of the workspace.

Per group of whole pairs (`mixpo.functions.plan_linear_passes`), in blocks of at most
`block_tokens` tokens: the block's raw logits [t, V] = hidden[rows] @ W^T (one GEMM into the
workspace), its log-sum-exp and label log-probs (`ops.logps`); once the group's log-probs
exist, the caller's coefficient function (the per-pair loss, by autograd) gives
d loss / d token log-prob; then the softmax gradient G of the block (`ops.grad_`) and its
GEMMs, dHidden rows = G @ W (written once) and dWeight += G^T @ hidden[rows].
A group larger than a block keeps its last block's logits from the forward; the tokens
before it ("recomputed", all groups' together, in blocks) are forwarded first for their
log-probs only and their logits recomputed at the end, once the coefficients are known:
(6 + 2r) nVH FLOPs for a recomputed share r, never more than the two-pass path's 8nVH,
inside the same workspace budget.

`ops` supplies the elementwise steps: `TorchGroupOps` here (the CPU path: one fused softmax
pass per block, the gradient's scalings moved onto the [t, H] side of the GEMMs) or the
Triton backend's `mixpo.kernels.linear_logps.TritonGroupOps`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from mixpo.kernels.linear_logps_torch import (Workspace, _fp32, _raw_logits, addmm_fp32,
                                              gather_rows, raw_rows_of, softmax_lse_,
                                              softmax_path, workspace_rows)
from mixpo.kernels.logits_logps_torch import (STAT_NAMES, _row_chunks, block_stats,
                                              transform_logits, transform_slope)


def one_pass_layout(block_tokens: int, vocab_size: int, hidden_size: int, dtype: torch.dtype,
                    accumulate: bool, weight_grad: bool) -> tuple:
    """The one pass's carved temporaries: one block's fp32 logits [t, V] and hidden rows
    [t, H]; for 16-bit weights also the 16-bit gradient [t, V], the fp32 dHidden rows
    [t, H], the 16-bit hidden rows and, when dWeight `accumulate`s over blocks (more than
    one group, or a group larger than a block), the fp32 dWeight accumulator [V, H]."""
    layout = [("logits", (block_tokens * vocab_size,), torch.float32),
              ("embed", (block_tokens, hidden_size), torch.float32)]
    if dtype != torch.float32:
        layout += [("grad16", (block_tokens, vocab_size), dtype),
                   ("dhidden", (block_tokens, hidden_size), torch.float32),
                   ("embed16", (block_tokens, hidden_size), dtype)]
        if accumulate and weight_grad:
            layout.append(("dweight", (vocab_size, hidden_size), torch.float32))
    return tuple(layout)


class BlockGrad(NamedTuple):
    """The softmax gradient of a block, G = row_scale[:, None] * block + onehot(labels) *
    label_coef[:, None]; row_scale None: the block holds G itself."""
    block: torch.Tensor
    row_scale: Optional[torch.Tensor] = None
    label_coef: Optional[torch.Tensor] = None


class _Softmax(NamedTuple):
    """`TorchGroupOps.logps`' state on its fast path: the block holds ATen's softmax P,
    whose rows sum to `totals` (1 up to ATen's fp32 lane sums)."""
    totals: torch.Tensor


class TorchGroupOps:
    """The one pass's elementwise steps on a block's raw fp32 logits [t, V], in torch.

    Plain logits (no softcap, logit scale 1, no statistics) on a CPU: one fused softmax pass
    in place and one read for exact row sums (`linear_logps_torch.softmax_lse_`), and the
    gradient is never written: G = coef * (onehot - p) stays P with per-row scales,
    which the GEMMs apply to their [t, H] operands. Otherwise: the general steps (three
    reductions and a scaling pass), G formed in place."""

    @staticmethod
    def logps(block, labels, logit_scale, softcap, stats, raw_rows):
        """(lse [t], transformed label logit [t], stats list, state for `grad_`);
        raw_rows(index [k]) -> the raw logits [k, V] of those rows again."""
        if softmax_path(block, logit_scale, softcap, stats):
            value = block.gather(-1, labels[:, None]).squeeze(-1)
            lse, totals = softmax_lse_(block, labels, value, raw_rows)
            return lse, value, [], _Softmax(totals)
        block = transform_logits(block, logit_scale, softcap)
        value = block.gather(-1, labels[:, None]).squeeze(-1)
        slope = transform_slope(block.clone(), logit_scale, softcap) if softcap \
            else logit_scale
        token_stats = []
        if stats:
            token_stats = block_stats(block, torch.logsumexp(block, dim=-1), labels)
        row_max = block.max(dim=-1, keepdim=True).values
        sums = block.sub_(row_max).exp_().sum(-1)
        return row_max.squeeze(-1) + sums.log(), value, token_stats, (sums, slope)

    @staticmethod
    def grad_(block, labels, lse, coef, logit_scale, softcap, state) -> BlockGrad:
        if isinstance(state, _Softmax):          # G = coef * onehot - (coef / totals) * P
            return BlockGrad(block, -coef / state.totals, coef)
        sums, slope = state
        grad = block.mul_((-coef / sums)[:, None])          # -coef * softmax
        grad.scatter_add_(-1, labels[:, None], coef[:, None])
        if softcap or logit_scale != 1.0:
            grad.mul_(slope)
        return BlockGrad(grad)


class _Gradients:
    """The one pass's outputs being accumulated: dHidden [N, H], dWeight (in the output for
    fp32 weights or a single block, else in the workspace's fp32 accumulator), dbias."""

    def __init__(self, hidden, weight, bias, workspace, accumulate, weight_grad):
        device = hidden.device
        self.weight, self.workspace = weight, workspace
        self.dhidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=device)
        self.direct = weight.dtype == torch.float32 or not accumulate
        self.dweight = None
        # The first block's dWeight GEMM writes the output (no zero fill, no read of zeros).
        self.dweight_written = False
        if weight_grad:
            self.dweight = torch.empty(weight.shape, dtype=weight.dtype, device=device) \
                if self.direct else workspace["dweight"].zero_()
        self.dbias = None if bias is None else torch.zeros(weight.shape[0],
                                                           dtype=torch.float32, device=device)

    def add_block(self, grad: BlockGrad, labels, rows, embed):
        """The GEMMs of one block: its rows of dHidden, its share of dWeight and dbias;
        embed [t, H] fp32 = hidden[rows]."""
        weight, dweight = self.weight, self.dweight
        block, scale, label_coef = grad
        if scale is not None and weight.dtype != torch.float32:
            # 16-bit GEMM operands: G itself is rounded once, as in the two-pass backward.
            block = block.mul_(scale[:, None])
            block.scatter_add_(-1, labels[:, None], label_coef[:, None])
            scale = None
        if scale is not None:        # G = scale * P + onehot * label_coef, P never scaled
            dh = (block @ weight).mul_(scale[:, None])
            dh += label_coef[:, None] * weight[labels]
            self.dhidden[rows] = dh.to(self.dhidden.dtype)
            if dweight is not None:
                self._add_dweight(block.T, embed * scale[:, None])
                dweight.index_add_(0, labels, embed * label_coef[:, None])
            if self.dbias is not None:
                self.dbias += scale @ block
                self.dbias.index_add_(0, labels, label_coef)
            return
        if weight.dtype == torch.float32:
            self.dhidden[rows] = (block @ weight).to(self.dhidden.dtype)
            if dweight is not None:
                self._add_dweight(block.T, embed)
        else:
            count = block.shape[0]
            grad16 = self.workspace["grad16"][:count]
            grad16.copy_(block)
            dh = self.workspace["dhidden"][:count].zero_()
            addmm_fp32(dh, grad16, weight)
            self.dhidden[rows] = dh.to(self.dhidden.dtype)
            embed16 = self.workspace["embed16"][:count]
            embed16.copy_(embed)
            if dweight is None:
                pass
            elif self.direct:
                self._add_dweight(grad16.T, embed16)
            else:
                addmm_fp32(dweight, grad16.T, embed16)
        if self.dbias is not None:
            self.dbias += block.sum(0)

    def _add_dweight(self, a, b) -> None:
        """dWeight (+)= a @ b in the output's dtype: written by the first block, then
        accumulated (fp32 weights; 16-bit ones only get here with a single block)."""
        if self.dweight_written:
            self.dweight.addmm_(a, b)
        else:
            torch.mm(a, b, out=self.dweight)
            self.dweight_written = True

    def results(self, weight, bias):
        if self.direct and self.dweight is not None and not self.dweight_written:
            self.dweight.zero_()                              # no token: a zero gradient
        return (self.dhidden, None if self.dweight is None else self.dweight.to(weight.dtype),
                None if self.dbias is None else self.dbias.to(bias.dtype))


def block_tokens_in(workspace_bytes, vocab_size: int, logit_scale: float, softcap,
                    stats: bool, triton: bool) -> int:
    """Tokens of one block: the workspace budget over the bytes each token of a block holds
    at once: its fp32 logits row and, on the torch backend's general path, the temporaries
    of `TorchGroupOps` (softcap's slope, one row held until the gradient; the statistics,
    up to three rows while they are reduced)."""
    rows = 1
    if not triton:
        rows += (1 if softcap else 0) + (3 if stats else 0)
    return workspace_rows(vocab_size, 4 * rows, workspace_bytes)


def blocks(group_sizes, block_tokens: int) -> tuple[int, bool]:
    """(rows of the workspace's logits block, whether dWeight accumulates over blocks) for
    groups of these sizes and a budget of `block_tokens`."""
    block_tokens = max(1, min(block_tokens, max(group_sizes, default=1)))
    return block_tokens, sum(-(-size // block_tokens) for size in group_sizes) > 1


def recomputed_tokens(group_sizes, block_tokens: int) -> int:
    """Tokens whose logits the one pass computes twice: those of each group before its
    last block."""
    return sum(max(0, size - block_tokens) for size in group_sizes)


def linear_token_logps_one_pass(hidden, weight, bias, labels, rows, groups, coefficients,
                                block_tokens: int, logit_scale: float = 1.0, softcap=None,
                                stats: bool = False, weight_grad: bool = True,
                                ops=TorchGroupOps, workspace=None):
    """Forward and exact backward in one pass over `groups` of tokens.

    hidden [N, H], weight [V, H], bias [V] or None, labels [n] int64, rows [n] int64 (as in
    `linear_logps_torch.linear_token_logps_forward`); groups: index tensors into the n
    tokens, disjoint, covering them, each closed under the coefficient function (whole
    pairs); coefficients(k, token_logps [t], aux [t] dict) -> d loss / d token log-prob [t]
    fp32 of group k (its position in `groups`), called once per group, in order, as soon as
    its log-probs exist; block_tokens: the most tokens whose fp32 logits [t, V] the
    workspace holds (a group larger than that recomputes its tokens before the last
    block, see the module docstring); ops: `TorchGroupOps` or the Triton backend's.
    dWeight accumulates in the output for fp32 weights; 16-bit weights need an fp32 [V, H]
    accumulator when there is more than one block. The temporaries are carved from
    `workspace` (a `Workspace` of `one_pass_layout`; default: allocated here).
    Returns (token_logps [n], lse [n], aux as the forward's, dhidden [N, H], dweight [V, H]
    or None with weight_grad=False, dbias [V] or None), gradients in the input dtypes;
    deterministic (fixed order, no atomics on a CPU).
    """
    num_tokens, (vocab_size, hidden_size) = rows.shape[0], weight.shape
    device = hidden.device
    bias32 = _fp32(bias)
    token_logps = torch.empty(num_tokens, dtype=torch.float32, device=device)
    lse = torch.empty_like(token_logps)
    label_logit = torch.empty_like(token_logps)
    stat_values = torch.empty((len(STAT_NAMES) if stats else 0, num_tokens),
                              dtype=torch.float32, device=device)
    block_tokens, accumulate = blocks([len(group) for group in groups], block_tokens)
    if workspace is None:
        workspace = Workspace(one_pass_layout(block_tokens, vocab_size, hidden_size,
                                              weight.dtype, accumulate, weight_grad), device)
    grads = _Gradients(hidden, weight, bias, workspace, accumulate, weight_grad)

    def logits_block(tokens, with_stats=stats):
        """(raw logits [t, V] in the workspace, embed [t, H], labels, ops.logps' outputs);
        with_stats=False: no statistics (a recomputed block's are already recorded)."""
        count, block_labels = len(tokens), labels[tokens]
        embed = gather_rows(hidden, rows[tokens], workspace["embed"][:count])
        block = _raw_logits(embed, weight, bias32,
                            workspace["logits"][:count * vocab_size].view(count, vocab_size))
        raw_label = block.gather(-1, block_labels[:, None]).squeeze(-1)
        return block, embed, block_labels, raw_label, ops.logps(
            block, block_labels, logit_scale, softcap, with_stats,
            raw_rows_of(embed, weight, bias32))

    def forward(tokens):
        block, embed, block_labels, raw, (block_lse, value, block_stats_, state) = \
            logits_block(tokens)
        token_logps[tokens], lse[tokens], label_logit[tokens] = value - block_lse, block_lse, raw
        for index, stat in enumerate(block_stats_):
            stat_values[index, tokens] = stat
        return block, embed, block_labels, state

    def backward(tokens, coef, block, embed, block_labels, state):
        grad = ops.grad_(block, block_labels, lse[tokens], coef, logit_scale, softcap, state)
        grads.add_block(grad, block_labels, rows[tokens], embed)

    def recompute(tokens):         # a function: its block's temporaries end with it
        block, embed, block_labels, _, (_, _, _, state) = logits_block(tokens, False)
        backward(tokens, token_coef[tokens], block, embed, block_labels, state)

    # The tokens of each group before its last block, all groups' together (larger GEMMs):
    # forwarded first for their log-probs, recomputed last with their coefficients.
    recomputed = [group[:max(0, len(group) - block_tokens)] for group in groups]
    recomputed_all = torch.cat(recomputed) if groups else rows.new_empty(0)
    recomputed_blocks = [recomputed_all[start:end] for start, end in
                         _row_chunks(recomputed_all.shape[0], block_tokens)]
    for tokens in recomputed_blocks:
        forward(tokens)
    token_coef = torch.zeros(num_tokens, dtype=torch.float32, device=device)
    for position, group in enumerate(groups):
        if not len(group):
            continue
        kept = group[len(recomputed[position]):]
        kept_block = forward(kept)
        coef = coefficients(position, token_logps[group],
                            {"label_logit": label_logit[group],
                             **{name: stat_values[index, group]
                                for index, name in enumerate(STAT_NAMES) if stats}}).float()
        token_coef[group] = coef
        backward(kept, coef[len(recomputed[position]):], *kept_block)
        del kept_block             # its state (softcap's slope block) freed before the next
    for tokens in recomputed_blocks:
        recompute(tokens)
    aux = {"label_logit": label_logit}
    if stats:
        aux.update(zip(STAT_NAMES, stat_values))
    return (token_logps, lse, aux, *grads.results(weight, bias))
