"""Plain-torch twin of every mixpo kernel: the test oracle and the CPU backend.

Each function here mirrors one Triton launch helper in `mixpo.kernels` with the same inputs and
outputs, so `backend="torch"` and `backend="triton"` are interchangeable. Work over [N, V] data
is chunked over tokens: at most about `CHUNK_BYTES` of fp32 logits exist at once, so the CPU
path never materialises a full fp32 [N, V] tensor.
"""
from __future__ import annotations

import torch

# fp32 bytes of logits alive at once in the chunked loops (per chunk of tokens). The
# logit-free path takes bigger chunks: each chunk re-reads the whole [V, H] weight.
CHUNK_BYTES = 64 * 2**20
LINEAR_CHUNK_BYTES = 128 * 2**20

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo")


def _rows_per_chunk(vocab_size: int, budget: int | None = None) -> int:
    return max(1, (budget or CHUNK_BYTES) // (4 * vocab_size))


def _row_chunks(num_rows: int, chunk: int):
    for start in range(0, num_rows, chunk):
        yield start, min(start + chunk, num_rows)


# ----------------------------------------------------------------------------------------------
# Token log-probs from materialised logits (twin of kernels/logits_logps.py)
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Logit-free token log-probs from hidden states and the LM-head weight (twin of
# kernels/linear_logps.py). Only the completion tokens listed in `rows` are computed.
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# Per-pair epilogue (twin of kernels/pair_loss.py)
# ----------------------------------------------------------------------------------------------
def normalizes_length(loss_type: str, average_log_prob: bool) -> bool:
    """IPO and SimPO always use per-token-normalised log-ratios; others on request."""
    return average_log_prob or loss_type in ("ipo", "simpo")


def sequence_rewards(logps, counts, ref_logps, beta, normalize):
    """Implicit rewards beta * (logp - ref), per token when `normalize`. All [S] fp32."""
    ratio = logps if ref_logps is None else logps - ref_logps
    scale = beta / counts if normalize else torch.full_like(logps, beta)
    return scale * ratio, scale


def pair_loss(logps, counts, ref_logps, hard, gamma, *, loss_type="sigmoid", beta=0.1,
              label_smoothing=0.0, average_log_prob=False, sft_weight=0.0):
    """Per-pair loss and its derivatives w.r.t. the summed sequence log-probs.

    logps, counts, ref_logps (or None): [2B] fp32, chosen first. hard [B] bool or None,
    gamma [B] fp32. Returns a dict of [B] fp32 tensors: per_pair_loss, d_chosen, d_rejected
    (d per_pair_loss / d summed logp), chosen_rewards, rejected_rewards.

    z = r_w - r_l - gamma with r = beta * (logp - ref) (per token when normalised), i.e.
    z = beta * h - gamma.  sigmoid/simpo: -(1-e) log s(z) - e log s(-z);
    robust: (-(1-e) log s(z) + e log s(-z)) / (1 - 2e); hinge: relu(1 - z);
    ipo: ((z - 1/2) / beta)^2 = (h - gamma/beta - 1/(2 beta))^2.
    Hard pairs take -logp_w / n_w (token-mean NLL of chosen); every pair adds
    sft_weight * that NLL.
    """
    num_pairs = logps.shape[0] // 2
    rewards, scale = sequence_rewards(logps, counts, ref_logps, beta,
                                      normalizes_length(loss_type, average_log_prob))
    chosen_rewards, rejected_rewards = rewards[:num_pairs], rewards[num_pairs:]
    z = chosen_rewards - rejected_rewards - gamma
    eps = label_smoothing
    if loss_type in ("sigmoid", "simpo"):
        loss = -(1 - eps) * torch.nn.functional.logsigmoid(z) \
            - eps * torch.nn.functional.logsigmoid(-z)
        dloss_dz = torch.sigmoid(z) - (1 - eps)
    elif loss_type == "robust":
        loss = (-(1 - eps) * torch.nn.functional.logsigmoid(z)
                + eps * torch.nn.functional.logsigmoid(-z)) / (1 - 2 * eps)
        dloss_dz = torch.sigmoid(z) - (1 - eps) / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = torch.relu(1 - z)
        dloss_dz = torch.where(z < 1, -1.0, 0.0)
    elif loss_type == "ipo":
        loss = ((z - 0.5) / beta) ** 2
        dloss_dz = 2 * (z - 0.5) / beta**2
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    d_chosen = dloss_dz * scale[:num_pairs]
    d_rejected = -dloss_dz * scale[num_pairs:]

    chosen_counts = counts[:num_pairs]
    nll = -logps[:num_pairs] / chosen_counts
    if hard is not None:
        # MixDPO routing: hard pairs learn only the chosen response (SFT).
        loss = torch.where(hard, nll, loss)
        d_chosen = torch.where(hard, -1.0 / chosen_counts, d_chosen)
        d_rejected = torch.where(hard, 0.0, d_rejected)
    if sft_weight:
        loss = loss + sft_weight * nll
        d_chosen = d_chosen - sft_weight / chosen_counts
    return {"per_pair_loss": loss, "d_chosen": d_chosen, "d_rejected": d_rejected,
            "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}


# ----------------------------------------------------------------------------------------------
# gamma-PO margin solve (twin of kernels/margin_solve.py)
# ----------------------------------------------------------------------------------------------
def solve_margins(gaps: torch.Tensor, gamma0: float, tau: float, iters: int = 20):
    """Multiplicative-weights (mirror descent on the simplex) solve of gamma-PO's margins.

    gaps [N] fp32: reward gaps of the solve set. Returns gamma [N] = gamma0 * N * p, where p
    starts uniform and takes `iters - 1` updates p <- p * exp(-eta * g), renormalised, with
    g = tau * (1 + log(N * (p + 1e-10))) + gamma0 * sigmoid(gamma0 * N * p - gap) and
    eta = min(0.5 / tau, 1). The authors' loop forms gamma before its last update, so
    `iters` loop turns apply `iters - 1` updates; we reproduce that.
    """
    num = gaps.shape[0]
    gaps = gaps.float()
    eta = min(0.5 / tau, 1.0)
    probs = torch.full_like(gaps, 1.0 / num)
    for _ in range(iters - 1):
        grad = tau * (1 + torch.log(num * (probs + 1e-10))) \
            + gamma0 * torch.sigmoid(gamma0 * num * probs - gaps)
        probs = probs * torch.exp(-eta * grad)
        probs = probs / probs.sum()
    return gamma0 * num * probs

