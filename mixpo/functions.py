"""The autograd Functions behind the loss API: two stages, each its own Function so that either
front end can feed the shared per-pair epilogue.

1. summed completion log-prob of every sequence, [S] fp32:
   - `LogitsSequenceLogps`: from materialised logits [S, T, V] (one read in forward, one read
     + write in backward, optionally in place);
   - `LinearSequenceLogps`: from hidden states and the LM-head weight, never materialising
     logits (the logit-free path; ignored tokens are compacted away first);
2. `PairLoss`: the per-pair epilogue on [B]-sized data (loss type, target margin, MixDPO
   routing, SFT weight); its backward hands d loss / d logp per sequence to stage 1.

`triton` (a bool, from `mixpo.kernels.dispatch.use_triton`) selects the Triton kernels or
their torch twins. No argument checking here: `mixpo.losses` does it.
"""
from __future__ import annotations

import torch

from mixpo.kernels.dispatch import kernel_ops


class LogitsSequenceLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, triton, inplace_backward):
        ops = kernel_ops("logits_logps", triton)
        token_logps, lse = ops.token_logps_forward(logits, labels, ignore_index)
        ctx.save_for_backward(logits, labels, lse)
        ctx.ignore_index, ctx.triton, ctx.inplace = ignore_index, triton, inplace_backward
        return token_logps.sum(dim=1)

    @staticmethod
    def backward(ctx, grad_seq):
        logits, labels, lse = ctx.saved_tensors
        ops = kernel_ops("logits_logps", ctx.triton)
        dlogits = ops.token_logps_backward(logits, labels, lse, grad_seq.float().contiguous(),
                                           ctx.ignore_index, inplace=ctx.inplace)
        return dlogits, None, None, None, None


class LinearSequenceLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, triton):
        num_seqs, seq_len, hidden_size = hidden.shape
        hidden2d = hidden.reshape(num_seqs * seq_len, hidden_size)
        flat_labels = labels.reshape(-1)
        # Compact the completion tokens: prompt and padding never reach a matmul.
        rows = torch.nonzero(flat_labels != ignore_index).squeeze(1)
        row_labels = flat_labels[rows]
        token_logps, lse = kernel_ops("linear_logps", triton).linear_token_logps_forward(
            hidden2d, weight, bias, row_labels, rows)
        seq_of_row = torch.div(rows, seq_len, rounding_mode="floor")
        seq_logps = torch.zeros(num_seqs, dtype=torch.float32, device=hidden.device)
        seq_logps.index_add_(0, seq_of_row, token_logps)
        ctx.save_for_backward(hidden, weight, bias, row_labels, rows, lse)
        ctx.triton, ctx.seq_len = triton, seq_len
        return seq_logps

    @staticmethod
    def backward(ctx, grad_seq):
        hidden, weight, bias, row_labels, rows, lse = ctx.saved_tensors
        grad_token = grad_seq.float()[torch.div(rows, ctx.seq_len, rounding_mode="floor")]
        hidden2d = hidden.reshape(-1, hidden.shape[-1])
        dhidden, dweight, dbias = kernel_ops("linear_logps", ctx.triton) \
            .linear_token_logps_backward(hidden2d, weight, bias, row_labels, rows, lse,
                                         grad_token.contiguous())
        return (dhidden.view_as(hidden), dweight if ctx.needs_input_grad[1] else None,
                dbias if ctx.needs_input_grad[2] else None, None, None, None)


class PairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logps, counts, ref_logps, hard, gamma, config, triton):
        out = kernel_ops("pair_loss", triton).pair_loss(logps, counts, ref_logps, hard, gamma,
                                                         config)
        ctx.save_for_backward(out["d_chosen"], out["d_rejected"])
        ctx.mark_non_differentiable(out["chosen_rewards"], out["rejected_rewards"])
        return out["per_pair_loss"], out["chosen_rewards"], out["rejected_rewards"]

    @staticmethod
    def backward(ctx, grad_pair, _grad_chosen_rewards, _grad_rejected_rewards):
        d_chosen, d_rejected = ctx.saved_tensors
        grad_logps = torch.cat([grad_pair * d_chosen, grad_pair * d_rejected])
        return grad_logps, None, None, None, None, None, None
