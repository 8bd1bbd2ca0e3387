"""Plain-torch twin of `mixpo.kernels.linear_logps` (same functions, inputs and outputs):
logit-free token log-probs from hidden states and the LM-head weight, computed for the
completion tokens listed in `rows` only, with logits alive one chunk of tokens at a time.
"""
from __future__ import annotations

import torch

from mixpo.kernels.logits_logps_torch import LINEAR_CHUNK_BYTES, _row_chunks, _rows_per_chunk


def _fp32(tensor):
    return None if tensor is None else tensor.float()


def linear_token_logps_forward(hidden, weight, bias, labels, rows):
    """Label log-prob and log-sum-exp of the tokens hidden[rows] under the LM head.

    hidden [N, H]; weight [V, H]; bias [V] or None; rows [n] int64 indexes into hidden (the
    completion tokens, ignored tokens compacted away); labels [n] int64 in [0, V).
    Returns (token_logps [n] fp32, lse [n] fp32). Logits exist only per chunk of tokens.
    """
    weight32, bias32 = _fp32(weight), _fp32(bias)
    num_tokens = rows.shape[0]
    token_logps = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(token_logps)
    chunk = _rows_per_chunk(weight.shape[0], LINEAR_CHUNK_BYTES)
    for t0, t1 in _row_chunks(num_tokens, chunk):
        block = hidden[rows[t0:t1]].float() @ weight32.T                # [t, V] fp32
        if bias32 is not None:
            block += bias32
        label_logit = block.gather(-1, labels[t0:t1, None]).squeeze(-1)
        # log-sum-exp in place on the chunk (torch.logsumexp would allocate a second one).
        row_max = block.max(dim=-1, keepdim=True).values
        lse[t0:t1] = row_max.squeeze(-1) + block.sub_(row_max).exp_().sum(-1).log()
        token_logps[t0:t1] = label_logit - lse[t0:t1]
    return token_logps, lse


def linear_token_logps_backward(hidden, weight, bias, labels, rows, lse, grad_token):
    """Gradients of sum(grad_token * token_logps) w.r.t. hidden, weight and bias.

    Same inputs as the forward plus its lse [n] and grad_token [n] fp32. Returns
    (dhidden [N, H], zero on rows not listed; dweight [V, H]; dbias [V] or None) in the input
    dtypes, accumulated in fp32.
    """
    weight32, bias32 = _fp32(weight), _fp32(bias)
    dhidden = torch.zeros_like(hidden)
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    dbias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32,
                                                  device=bias.device)
    chunk = _rows_per_chunk(weight.shape[0], LINEAR_CHUNK_BYTES)
    for t0, t1 in _row_chunks(rows.shape[0], chunk):
        hidden_block = hidden[rows[t0:t1]].float()
        block = hidden_block @ weight32.T
        if bias32 is not None:
            block += bias32
        coef = grad_token[t0:t1, None].float()
        # d logp / d logits = onehot(label) - softmax, scaled by each token's coefficient.
        grad_logits = block.sub_(lse[t0:t1, None]).exp_().mul_(-coef)  # in place, one buffer
        grad_logits.scatter_add_(-1, labels[t0:t1, None], coef)
        dhidden[rows[t0:t1]] = (grad_logits @ weight32).to(hidden.dtype)
        dweight.addmm_(grad_logits.T, hidden_block)  # accumulate without a [V, H] temporary
        if dbias is not None:
            dbias += grad_logits.sum(0)
    return dhidden, dweight.to(weight.dtype), None if dbias is None else dbias.to(bias.dtype)
