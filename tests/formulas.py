"""The per-pair losses of TRL and the papers written out independently of mixpo,
differentiable by autograd: the oracle the kernel tests check against. Written in TRL's style
(chosen/rejected log-ratios, then one formula per type), not mixpo's (no hand-written
derivatives, no kernel codes)."""
import math

import torch
import torch.nn.functional as F

NORMALIZED = {"ipo", "sigmoid_norm", "simpo", "orpo"}
REFERENCE_FREE = {"simpo", "cpo", "orpo"}


def _score(u, kind, alpha):
    if kind == "forward_kl":
        return 1 - torch.exp(-u)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(u)
    if kind == "alpha_divergence":
        return (torch.exp(((alpha - 1) * u).clamp(max=80)) - 1) / (alpha - 1)
    return u


def _cdpo(z, eps):
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _log1mexp(x):
    return torch.log(-torch.expm1(x))


def pair_losses(logps, counts, *, ref_logps=None, loss_type="sigmoid", loss_weights=None,
                beta=0.1, gamma=None, label_smoothing=0.0, average_log_prob=None, hard=None,
                sft_weight=0.0, nll_normalization="batch", cpo_alpha=1.0, discopop_tau=0.05,
                f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, rdpo_alpha=0.0,
                dpop_lambda=0.0, weights=None, nll_logps=None):
    """logps / counts [2B] (chosen first): summed completion log-probs and token counts.
    Returns (per-pair losses [B], the scalar loss)."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    loss_weights = loss_weights or [1.0] * len(types)
    b = logps.shape[0] // 2
    nll_logps = logps if nll_logps is None else nll_logps
    if gamma is None:
        gamma = 0.5 if types == ["simpo"] else 0.0
    ref = torch.zeros_like(logps) if ref_logps is None else ref_logps
    chosen_logratios, rejected_logratios = logps[:b] - ref[:b], logps[b:] - ref[b:]
    n_w, n_l = counts[:b], counts[b:]
    eps = label_smoothing
    total = torch.zeros(b, dtype=logps.dtype)
    nll_weight = sft_weight
    for name, weight in zip(types, loss_weights):
        norm = name in NORMALIZED if average_log_prob is None else average_log_prob
        len_w, len_l = (n_w, n_l) if norm else (1.0, 1.0)
        uw, ul = chosen_logratios / len_w, rejected_logratios / len_l
        sw = _score(chosen_logratios, f_divergence_type, f_alpha_divergence_coef) / len_w
        sl = _score(rejected_logratios, f_divergence_type, f_alpha_divergence_coef) / len_l
        h = sw - sl - dpop_lambda * torch.clamp(-uw, min=0)
        z = beta * h - gamma - rdpo_alpha * (n_w - n_l)
        if name in ("sigmoid", "sigmoid_norm", "simpo", "cpo"):
            loss = _cdpo(z, eps)
            if name == "cpo":
                nll_weight += weight * cpo_alpha
        elif name == "robust":
            loss = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        elif name == "hinge":
            loss = torch.relu(1 - z)
        elif name == "ipo":
            loss = (h - gamma / beta - 1 / (2 * beta)) ** 2
        elif name == "exo_pair":
            loss = torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) \
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps))
        elif name == "discopop":
            mix = torch.sigmoid(z / discopop_tau)
            loss = -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix
        elif name == "nca_pair":
            loss = -F.logsigmoid(beta * uw) - 0.5 * F.logsigmoid(-beta * uw) \
                - 0.5 * F.logsigmoid(-beta * ul)
        elif name == "bco_pair":
            loss = -F.logsigmoid(beta * uw) - F.logsigmoid(-beta * ul)
        elif name == "sppo_hard":
            loss = (uw - 0.5 / beta) ** 2 + (ul + 0.5 / beta) ** 2
        elif name == "apo_zero":
            loss = 1 - torch.sigmoid(beta * uw) + torch.sigmoid(beta * ul)
        elif name == "apo_down":
            loss = torch.sigmoid(beta * uw) + 1 - torch.sigmoid(beta * (uw - ul))
        elif name == "orpo":
            log_odds = (uw - ul) - (_log1mexp(uw) - _log1mexp(ul))
            loss = -beta * F.logsigmoid(log_odds)
            nll_weight += weight
        elif name == "sft":
            nll_weight += weight
            continue
        elif name in ("aot", "aot_unpaired"):
            if name == "aot":
                first, second = logps[:b] - logps[b:], ref[:b] - ref[b:]
            else:
                first, second = chosen_logratios, rejected_logratios
            loss = _cdpo(beta * (torch.sort(first).values - torch.sort(second).values), eps)
        else:
            raise ValueError(name)
        if weights is not None:
            loss = loss * weights
        total = total + weight * loss
    nll_pair = -nll_logps[:b] / n_w
    if hard is not None:
        total = torch.where(hard, nll_pair, total)
    if nll_weight:
        if nll_normalization == "batch":
            total = total + nll_weight * (-nll_logps[:b].sum() / n_w.sum())
        else:
            total = total + nll_weight * nll_pair
    return total, total.mean()


def sequence_logps_from_logits(logits, labels, ignore_index=-100, logit_scale=1.0,
                               softcap=None):
    """Summed completion log-probs [S] and counts [S] via log_softmax + gather, after the
    logit transform (in float64 when the logits are)."""
    z = logits.float() if logits.dtype != torch.float64 else logits
    z = z * logit_scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    logprobs = torch.log_softmax(z, dim=-1)
    mask = labels != ignore_index
    token = logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    return token.sum(1), mask.sum(1)
