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
    with pytest.raises(ValueError, match=r"logits produced non-finite log-probs .*\[1\]"):
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
    hidden[2, 1, 0] = float("inf")
    with pytest.raises(ValueError, match="hidden produced non-finite"):
        mixpo.linear_preference_loss(hidden, weight, labels)


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
