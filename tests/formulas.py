"""The per-pair losses of ANCHORS.md / TRL written out independently of mixpo, differentiable
by autograd: the oracle both kernel test files check against."""
import torch
import torch.nn.functional as F


def pair_losses(logps, counts, *, ref_logps=None, loss_type="sigmoid", beta=0.1, gamma=0.0,
                label_smoothing=0.0, average_log_prob=False, hard=None, sft_weight=0.0):
    """logps / counts [2B] (chosen first): summed completion log-probs and token counts.
    Returns the per-pair losses [B]."""
    num_pairs = logps.shape[0] // 2
    ratio = logps if ref_logps is None else logps - ref_logps
    if average_log_prob or loss_type in ("ipo", "simpo"):
        ratio = ratio / counts
    h = ratio[:num_pairs] - ratio[num_pairs:]
    z, eps = beta * h - gamma, label_smoothing
    if loss_type in ("sigmoid", "simpo"):
        loss = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    elif loss_type == "robust":
        loss = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        loss = torch.relu(1 - z)
    else:  # TRL's ipo (h - 1/(2 beta))^2 on per-token log-ratios, the margin inside
        loss = (h - gamma / beta - 1 / (2 * beta)) ** 2
    nll = -logps[:num_pairs] / counts[:num_pairs]
    if hard is not None:
        loss = torch.where(hard, nll, loss)
    return loss + sft_weight * nll


def sequence_logps_from_logits(logits, labels, ignore_index=-100):
    """Summed completion log-probs [S] and counts [S] via log_softmax + gather."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    mask = labels != ignore_index
    token = logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    return token.sum(1), mask.sum(1)
