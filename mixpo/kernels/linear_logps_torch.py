"""Plain-torch twin of `mixpo.kernels.linear_logps` (same functions, inputs and outputs):
logit-free token log-probs from hidden states and the LM-head weight, computed for the
completion tokens listed in `rows` only, with logits alive one chunk of tokens at a time.
"""
from __future__ import annotations

import torch

from mixpo.kernels.logits_logps_torch import (LINEAR_CHUNK_BYTES, STAT_NAMES, _row_chunks,
                                              _rows_per_chunk, block_stats, transform_logits,
                                              transform_slope)


def _fp32(tensor):
    return None if tensor is None else tensor.float()


def _raw_logits(hidden, weight32, bias32, rows):
    block = hidden[rows].float() @ weight32.T                # [t, V] fp32
    if bias32 is not None:
        block += bias32
    return block


def linear_token_logps_forward(hidden, weight, bias, labels, rows, logit_scale: float = 1.0,
                               softcap=None, stats: bool = False):
    """Label log-prob and log-sum-exp of the tokens hidden[rows] under the LM head and the
    logit transform.

    hidden [N, H]; weight [V, H]; bias [V] or None; rows [n] int64 indexes into hidden (the
    completion tokens, ignored tokens compacted away); labels [n] int64 in [0, V).
    Returns (token_logps [n] fp32, lse [n] fp32, aux: "label_logit" -> the labels' raw
    logits [n], plus STAT_NAMES -> [n] with `stats`). Logits exist only per chunk of tokens.
    """
    weight32, bias32 = _fp32(weight), _fp32(bias)
    num_tokens = rows.shape[0]
    token_logps = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(token_logps)
    label_logit = torch.empty_like(token_logps)
    stat_values = torch.empty((len(STAT_NAMES) if stats else 0, num_tokens),
                              dtype=torch.float32, device=hidden.device)
    chunk = _rows_per_chunk(weight.shape[0], LINEAR_CHUNK_BYTES)
    for t0, t1 in _row_chunks(num_tokens, chunk):
        block = _raw_logits(hidden, weight32, bias32, rows[t0:t1])
        label_logit[t0:t1] = block.gather(-1, labels[t0:t1, None]).squeeze(-1)
        block = transform_logits(block, logit_scale, softcap)
        label_value = block.gather(-1, labels[t0:t1, None]).squeeze(-1)
        if stats:
            block_lse = torch.logsumexp(block, dim=-1)
            for index, value in enumerate(block_stats(block, block_lse, labels[t0:t1])):
                stat_values[index, t0:t1] = value
            lse[t0:t1] = block_lse
        else:
            # log-sum-exp in place on the chunk (torch.logsumexp would allocate a second one).
            row_max = block.max(dim=-1, keepdim=True).values
            lse[t0:t1] = row_max.squeeze(-1) + block.sub_(row_max).exp_().sum(-1).log()
        token_logps[t0:t1] = label_value - lse[t0:t1]
    aux = {"label_logit": label_logit}
    if stats:
        aux.update(zip(STAT_NAMES, stat_values))
    return token_logps, lse, aux


def linear_token_logps_backward(hidden, weight, bias, labels, rows, lse, grad_token,
                                label_logit=None, logit_scale: float = 1.0, softcap=None,
                                weight_grad: bool = True):
    """Gradients of sum(grad_token * token_logps) w.r.t. hidden, weight and bias.

    Same inputs as the forward plus its lse [n] and grad_token [n] fp32 (`label_logit`, the
    Triton helper's input, is recomputed here). Returns (dhidden [N, H], zero on rows not
    listed; dweight [V, H], or None with `weight_grad=False` (a frozen head: no dWeight
    product or buffer); dbias [V] or None) in the input dtypes, accumulated in fp32.
    """
    weight32, bias32 = _fp32(weight), _fp32(bias)
    dhidden = torch.zeros_like(hidden)
    dweight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
        if weight_grad else None
    dbias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32,
                                                  device=bias.device)
    transformed = logit_scale != 1.0 or bool(softcap)
    chunk = _rows_per_chunk(weight.shape[0], LINEAR_CHUNK_BYTES)
    for t0, t1 in _row_chunks(rows.shape[0], chunk):
        hidden_block = hidden[rows[t0:t1]].float()
        block = hidden_block @ weight32.T
        if bias32 is not None:
            block += bias32
        coef = grad_token[t0:t1, None].float()
        if transformed:
            block = transform_logits(block, logit_scale, softcap)
            slope = transform_slope(block.clone(), logit_scale, softcap) if softcap \
                else logit_scale
        # d logp / d logits = (onehot(label) - softmax) * dz'/dz, scaled by each token's
        # coefficient; in place, one buffer (two with softcap).
        grad_logits = block.sub_(lse[t0:t1, None]).exp_().mul_(-coef)
        grad_logits.scatter_add_(-1, labels[t0:t1, None], coef)
        if transformed:
            grad_logits.mul_(slope)
        dhidden[rows[t0:t1]] = (grad_logits @ weight32).to(hidden.dtype)
        if dweight is not None:
            dweight.addmm_(grad_logits.T, hidden_block)  # accumulate, no [V, H] temporary
        if dbias is not None:
            dbias += grad_logits.sum(0)
    return (dhidden, None if dweight is None else dweight.to(weight.dtype),
            None if dbias is None else dbias.to(bias.dtype))
