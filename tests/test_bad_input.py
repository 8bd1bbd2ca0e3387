"""Bad input raises ValueError naming the argument; nothing is silently dropped."""
import pytest
import torch

import mixpo


def batch(num_pairs=2, seq_len=5, vocab_size=50):
    logits = torch.randn(2 * num_pairs, seq_len, vocab_size)
    labels = torch.randint(0, vocab_size, (2 * num_pairs, seq_len))
    labels[:, 0] = -100
    return logits, labels


def call(**overrides):
    logits, labels = batch()
    kwargs = dict(logits=logits, labels=labels, backend="torch")
    kwargs.update(overrides)
    return mixpo.preference_loss(kwargs.pop("logits"), kwargs.pop("labels"), **kwargs)


def with_labels(edit):
    logits, labels = batch()
    edit(labels)
    return dict(logits=logits, labels=labels)


@pytest.mark.parametrize("overrides,match", [
    (dict(logits=torch.randn(3, 5, 50)), "logits must have an even"),
    (dict(logits=torch.randn(4, 5)), "logits must be a tensor of shape"),
    (dict(logits=torch.randn(4, 5, 50, dtype=torch.float64)), "logits must be float32"),
    (dict(labels=torch.zeros(4, 6, dtype=torch.long)), "labels must have shape"),
    (dict(labels=torch.zeros(4, 5)), "labels must be an integer tensor"),
    (with_labels(lambda labels: labels.__setitem__((1, 2), 50)), "labels must be in"),
    (with_labels(lambda labels: labels.__setitem__((1, 2), -3)), "labels must be in"),
    (with_labels(lambda labels: labels.__setitem__(2, -100)), r"labels: sequence\(s\) \[2\]"),
    (dict(ref_logps=torch.zeros(3)), "ref_logps must have shape"),
    (dict(ref_logps=torch.tensor([0.0, float("nan"), 0.0, 0.0])), "ref_logps contains NaN"),
    (dict(hard=torch.tensor([True])), "hard must be a bool tensor"),
    (dict(hard=torch.tensor([0.5, 1.0])), "hard must be a bool tensor"),
    (dict(gamma=torch.zeros(3)), "gamma must have shape"),
    (dict(gamma=float("inf")), "gamma must be finite"),
    (dict(gamma=torch.tensor([0.0, float("inf")])), "gamma contains NaN"),
    (dict(loss_type="kto"), "loss_type must be one of"),
    (dict(beta=0.0), "beta must be"),
    (dict(label_smoothing=0.5), "label_smoothing must be in"),
    (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing is not defined"),
    (dict(sft_weight=-1.0), "sft_weight must be"),
    (dict(loss_type="simpo", ref_logps=torch.zeros(4)), "ref_logps must be None"),
    (dict(backend="cuda"), "backend must be"),
    (dict(margin="adaptive"), "margin must be"),
    (dict(margin=mixpo.AdaptiveMargin(1.0, 1.0), gamma=0.5), "either gamma or margin"),
])
def test_preference_loss_rejects(overrides, match):
    with pytest.raises(ValueError, match=match):
        call(**overrides)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_in_logits_is_detected(backend):
    logits, labels = batch()
    logits[1, 3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"logits contains NaN or inf .*\[1\]"):
        mixpo.preference_loss(logits, labels, backend=backend)


def test_linear_rejects():
    hidden, weight = torch.randn(4, 5, 8), torch.randn(50, 8)
    labels = torch.randint(0, 50, (4, 5))
    with pytest.raises(ValueError, match="weight must have shape"):
        mixpo.linear_preference_loss(hidden, torch.randn(50, 7), labels)
    with pytest.raises(ValueError, match="weight dtype"):
        mixpo.linear_preference_loss(hidden, weight.bfloat16(), labels)
    with pytest.raises(ValueError, match="bias must have shape"):
        mixpo.linear_preference_loss(hidden, weight, labels, bias=torch.zeros(49))
    with pytest.raises(ValueError, match="hidden must have an even"):
        mixpo.linear_preference_loss(hidden[:3], weight, labels[:3])
    bad_weight = weight.clone()
    bad_weight[int(labels[1, 2])] = float("nan")      # NaN in the head is blamed on weight
    with pytest.raises(ValueError, match=r"^weight contains NaN"):
        mixpo.linear_preference_loss(hidden, bad_weight, labels)
    hidden[2, 1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"^hidden contains NaN or inf .*\[2\]"):
        mixpo.linear_preference_loss(hidden, weight, labels)


@pytest.mark.parametrize("options,match", [
    (dict(beta=True), "beta must be a finite float"),              # a bool is not 1.0
    (dict(loss_type=["sigmoid", "simpo"]), "mixes reference-free"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights must be 2"),
    (dict(loss_type=["sigmoid", "sigmoid"]), "twice"),
    (dict(loss_type="exo_pair"), "needs label_smoothing > 0"),
    (dict(loss_type="bco_pair", gamma=0.5), "apply to the margin loss types"),
    (dict(loss_type="nca_pair", f_divergence_type="forward_kl"), "margin loss types only"),
    (dict(f_divergence_type="tv"), "f_divergence_type must be one of"),
    (dict(nll_normalization="token"), "nll_normalization must be one of"),
    (dict(ld_alpha=1.5), "ld_alpha must be None or in"),
    (dict(softcap=0.0), "softcap must be None"),
    (dict(logit_scale=-1.0), "logit_scale must be"),
    (dict(loss_type="aot", hard=torch.tensor([True, False])), "not defined for aot"),
    (dict(loss_type="aot", use_weighting=True), "use_weighting is not defined"),
    (dict(average_log_prob="yes"), "average_log_prob must be"),
])
def test_loss_options_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        call(**options)


def test_shift_labels_needs_2d():
    with pytest.raises(ValueError, match="labels must be a"):
        mixpo.shift_labels(torch.arange(5))


def test_triton_backend_on_cpu_without_interpreter_says_how():
    import subprocess
    import sys
    code = ("import torch, mixpo\n"
            "try:\n"
            "    mixpo.preference_loss(torch.randn(2, 3, 5), torch.ones(2, 3, dtype=torch.long),"
            " backend='triton')\n"
            "except ValueError as error:\n"
            "    print(error)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert "set TRITON_INTERPRET=1 before importing mixpo" in out.stdout, out.stderr[-500:]


def test_margin_rejects():
    with pytest.raises(ValueError, match="tau must be"):
        mixpo.AdaptiveMargin(1.0, 0.0)
    with pytest.raises(ValueError, match="gamma0 must be"):
        mixpo.AdaptiveMargin(float("nan"), 1.0)
    with pytest.raises(ValueError, match="init_queue"):
        mixpo.AdaptiveMargin(1.0, 1.0, init_queue=[float("inf")])
    solver = mixpo.AdaptiveMargin(1.0, 1.0)
    with pytest.raises(ValueError, match="reward_gaps contain NaN"):
        solver(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="reward_gaps must be"):
        solver(torch.zeros(2, 2))
