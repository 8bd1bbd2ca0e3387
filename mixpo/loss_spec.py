"""The loss specification: which loss types exist, how each normalises length, what its rewards
are. The single definition that the kernels, their torch twins, the loss API, the trainer's
config, the TRL integration and the command line all read.

Notation (as in the README's loss table): per sequence `logp` = summed completion log-probs,
`n` its completion tokens, `ref` the reference model's `logp`, `u = logp - ref` the log-ratio
(`u = logp` for a reference-free type), per token `u / n` when the type normalises length.
`h = u_w - u_l`, `z = beta * h - gamma` (with an f-divergence, `h = s(u_w) - s(u_l)`),
`e` = label_smoothing, `s` = sigmoid. Type names and hyper-parameter names are TRL's (trl
1.16 DPOTrainer; SimPO, CPO and ORPO as in TRL's CPOTrainer / ORPOTrainer and Liger-Kernel).

Imports nothing heavy at module level (the command line reads it to build its parsers); the
functions work on tensors through their methods.
"""
from __future__ import annotations

from dataclasses import dataclass

# How a family of loss types reads the pair (kernels/pair_loss.py implements each family):
IGNORE_INDEX = -100  # the label of prompt and padding positions, everywhere (HF's convention)


def shift_labels(labels, ignore_index: int = IGNORE_INDEX):
    """HF-style labels [S, T] (label t = token t) -> position-aligned labels (label t = token
    t + 1): position t's prediction is scored against shifted[:, t]; the last position gets
    ignore_index. The one definition (a tensor method call, so no torch import here)."""
    shifted = labels.new_full(labels.shape, ignore_index)
    shifted[:, :-1] = labels[:, 1:]
    return shifted

MARGIN = "margin"    # a function of z = beta * h - gamma (gamma-PO, R-DPO, DPOP, f-divergence)
RATIOS = "ratios"    # of beta * u_w and beta * u_l separately (no margin)
ODDS = "odds"        # ORPO: the log-odds of the length-averaged log-probs
NLL = "nll"          # TRL's "sft": only the NLL of the chosen responses
SORTED = "sorted"    # AOT: sorted across the batch, then sigmoid (batch-level, in torch)


@dataclass(frozen=True)
class LossType:
    """One per-pair loss formula.

    name: the value of `loss_type`.
    kernel_code: the type's formula in `mixpo.kernels.pair_loss` (MARGIN_FORMULAS /
        RATIO_FORMULAS; None for the batch-level and NLL-only types).
    family: MARGIN, RATIOS, ODDS, NLL or SORTED (above).
    formula / source: documentation (README table, docstrings).
    normalized: per-token log-ratios by default (`average_log_prob=None` follows this).
    reward_normalized: the logged rewards are per token (SimPO, ORPO); others report TRL's
        summed `beta * (logp - ref)`.
    reference_free: no reference log-probs (ref_logps must be None).
    label_smoothing: accepts label_smoothing > 0 ("required": must be > 0).
    nll: adds an NLL term on the chosen responses (CPO: cpo_alpha, ORPO: 1).
    default_gamma: the target margin when `gamma` is unset (SimPO 0.5, as TRL's CPOConfig
        and Liger; 0 otherwise); margin family only.
    """
    name: str
    kernel_code: int | None
    family: str
    formula: str
    source: str
    normalized: bool = False
    reward_normalized: bool = False
    reference_free: bool = False
    label_smoothing: bool | str = False
    nll: str | None = None
    default_gamma: float = 0.0


LOSS_TYPES: dict[str, LossType] = {spec.name: spec for spec in (
    LossType("sigmoid", 0, MARGIN, "-(1-e) log s(z) - e log s(-z)",
             "DPO (Rafailov et al. 2023); label smoothing = cDPO (Mitchell 2023), which "
             "trl 1.16's sigmoid ignores", label_smoothing=True),
    LossType("robust", 1, MARGIN, "(-(1-e) log s(z) + e log s(-z)) / (1 - 2e)",
             "rDPO (Chowdhury et al. 2024)", label_smoothing=True),
    LossType("hinge", 2, MARGIN, "relu(1 - z)", "SLiC-HF (Zhao et al. 2023)"),
    LossType("ipo", 3, MARGIN, "((z - 1/2) / beta)^2 = (h - gamma/beta - 1/(2 beta))^2, "
             "per-token h", "IPO (Azar et al. 2023), TRL's per-token form", normalized=True),
    LossType("exo_pair", 4, MARGIN, "s(z) (log s(z) - log(1-e)) + s(-z) (log s(-z) - log e)",
             "EXO (Ji et al. 2024)", label_smoothing="required"),
    LossType("discopop", 5, MARGIN, "-log s(z) (1 - m) + exp(-z) m, m = s(z / discopop_tau)",
             "DiscoPOP (Chan et al. 2024)"),
    LossType("sigmoid_norm", 0, MARGIN, "-(1-e) log s(z) - e log s(-z), per-token h",
             "length-normalised DPO (TRL)", normalized=True, label_smoothing=True),
    LossType("simpo", 0, MARGIN, "-(1-e) log s(beta (avg_w - avg_l) - gamma)",
             "SimPO (Meng et al. 2024); gamma defaults to 0.5 as TRL's CPOConfig and Liger",
             normalized=True, reward_normalized=True, reference_free=True,
             label_smoothing=True, default_gamma=0.5),
    LossType("cpo", 0, MARGIN, "-(1-e) log s(beta (logp_w - logp_l)) + cpo_alpha NLL_w",
             "CPO (Xu et al. 2024), TRL CPOTrainer / Liger", reference_free=True,
             label_smoothing=True, nll="cpo_alpha"),
    LossType("nca_pair", 6, RATIOS, "-log s(r_w) - log s(-r_w)/2 - log s(-r_l)/2, "
             "r = beta u", "NCA (Chen et al. 2024)"),
    LossType("bco_pair", 7, RATIOS, "-log s(r_w) - log s(-r_l)",
             "BCO pair form, stateless as trl 1.16 (Jung et al. 2024)"),
    LossType("sppo_hard", 8, RATIOS, "(u_w - 1/(2 beta))^2 + (u_l + 1/(2 beta))^2",
             "SPPO hard-label (Wu et al. 2024)"),
    LossType("apo_zero", 9, RATIOS, "1 - s(r_w) + s(r_l)", "APO-zero (D'Oosterlinck et al. "
             "2024)"),
    LossType("apo_down", 10, RATIOS, "s(r_w) + 1 - s(r_w - r_l)",
             "APO-down (D'Oosterlinck et al. 2024)"),
    LossType("orpo", 11, ODDS, "-beta log s(log odds(avg_w) - log odds(avg_l)) + NLL_w",
             "ORPO (Hong et al. 2024); beta is the paper's lambda; NLL on completion tokens "
             "(Liger), TRL's ORPOTrainer also counts the prompt", normalized=True,
             reward_normalized=True, reference_free=True, nll="one"),
    LossType("sft", None, NLL, "NLL_w: mean NLL of the chosen completion tokens",
             "TRL's sft loss type (RPO = [sigmoid, sft] with loss_weights [1, alpha])"),
    LossType("aot", None, SORTED, "cDPO sigmoid of beta (sort(logp_w - logp_l) - "
             "sort(ref_w - ref_l)), sorted across the batch", "AOT (Melnyk et al. 2024)",
             label_smoothing=True),
    LossType("aot_unpaired", None, SORTED, "cDPO sigmoid of beta (sort(u_w) - sort(u_l)), "
             "sorted across the batch", "AOT unpaired (Melnyk et al. 2024)",
             label_smoothing=True),
)}

# f_divergence_type -> kernel code (TRL's names; Wang et al. 2023, "Beyond reverse KL").
F_DIVERGENCES = {"reverse_kl": 0, "forward_kl": 1, "js_divergence": 2, "alpha_divergence": 3}
NLL_NORMALIZATIONS = {
    "batch": "mean over all chosen completion tokens of the batch (TRL, Liger)",
    "pair": "mean over pairs of each chosen response's token-mean NLL",
}


def loss_type_spec(name: str) -> LossType:
    """The LossType called `name`, or ValueError listing the known ones."""
    if name not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {name!r}")
    return LOSS_TYPES[name]


def normalizes_length(loss_type: str, average_log_prob: bool | None = None) -> bool:
    """Whether `loss_type` works on per-token log-ratios: `average_log_prob` when given,
    else the type's own convention (`LossType.normalized`)."""
    if average_log_prob is None:
        return loss_type_spec(loss_type).normalized
    return bool(average_log_prob)


def sequence_rewards(logps, counts, ref_logps, beta: float, normalize: bool):
    """Implicit rewards `beta * (logp - ref)` (per token when `normalize`) and the scale
    d reward / d logp, both [S] fp32 tensors like `logps`."""
    ratio = logps if ref_logps is None else logps - ref_logps
    scale = beta / counts if normalize else logps.new_full(logps.shape, beta)
    return scale * ratio, scale
