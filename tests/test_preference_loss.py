"""preference_loss: Triton kernels (interpreted on CPU) vs the torch twin vs formulas written
independently here with log_softmax + autograd."""
import itertools

import pytest
import torch

import mixpo
from formulas import pair_losses, sequence_logps_from_logits

LOSS_TYPES = ["sigmoid", "ipo", "hinge", "robust", "simpo"]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def independent_loss(logits, labels, **kwargs):
    """Per-pair losses and summed log-probs from log_softmax + the written-out formulas."""
    logps, counts = sequence_logps_from_logits(logits, labels)
    return pair_losses(logps, counts, **kwargs), logps


def make_batch(num_pairs=2, seq_len=6, vocab_size=300, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(2 * num_pairs, seq_len, vocab_size, generator=generator)).to(dtype)
    labels = torch.randint(0, vocab_size, (2 * num_pairs, seq_len), generator=generator)
    # Ragged: prompt of 1-2 tokens, right padding of 0-2 tokens, per row.
    for row in range(2 * num_pairs):
        labels[row, : 1 + row % 2] = -100
        if row % 3:
            labels[row, seq_len - row % 3:] = -100
    ref_logps = -20 + 5 * torch.randn(2 * num_pairs, generator=generator)
    return logits, labels, ref_logps


def run(logits, labels, backend, **kwargs):
    leaf = logits.clone().requires_grad_()
    out = mixpo.preference_loss(leaf, labels, backend=backend, **kwargs)
    out.loss.backward()
    return out, leaf.grad.float()


CASES = list(itertools.product(LOSS_TYPES, [torch.float32, torch.bfloat16, torch.float16],
                               [False, True], ["scalar", "per_pair", "adaptive"]))


@pytest.mark.parametrize("loss_type,dtype,routing,margin_kind", CASES)
def test_triton_matches_torch_and_formulas(loss_type, dtype, routing, margin_kind):
    logits, labels, ref_logps = make_batch(dtype=dtype)
    num_pairs = logits.shape[0] // 2
    kwargs = dict(loss_type=loss_type, beta=0.5,
                  ref_logps=None if loss_type == "simpo" else ref_logps,
                  label_smoothing=0.1 if loss_type in ("sigmoid", "robust", "simpo") else 0.0,
                  hard=torch.tensor([True, False]) if routing else None,
                  sft_weight=0.2 if routing else 0.0)
    outputs = {}
    for backend in ("torch", "triton"):
        call = dict(kwargs)
        if margin_kind == "scalar":
            call["gamma"] = 0.3
        elif margin_kind == "per_pair":
            call["gamma"] = torch.tensor([0.1, 0.7])
        else:  # fresh, identically seeded solvers so both backends see the same sample
            call["margin"] = mixpo.AdaptiveMargin(0.5, 5.0, seed=3)
        outputs[backend] = run(logits, labels, backend, **call)
    (out_torch, grad_torch), (out_triton, grad_triton) = outputs["torch"], outputs["triton"]
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out_triton.loss, out_torch.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_triton.chosen_logps, out_torch.chosen_logps,
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_triton, grad_torch, rtol=tol, atol=tol * grad_torch.abs().max())
    assert out_triton.per_pair_loss.shape == (num_pairs,)

    # Independent formulas, with the gamma the solver actually produced.
    leaf = logits.clone().requires_grad_()
    per_pair, logps = independent_loss(leaf, labels, gamma=out_triton.gamma,
                                       average_log_prob=False, **kwargs)
    per_pair.mean().backward()
    torch.testing.assert_close(out_triton.per_pair_loss, per_pair.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_triton.chosen_logps, logps[:num_pairs].detach(),
                               rtol=1e-5, atol=1e-3)
    expected_grad = leaf.grad.float()
    torch.testing.assert_close(grad_triton, expected_grad, rtol=tol,
                               atol=tol * expected_grad.abs().max())
    if routing:  # a hard pair's rejected response gets no gradient
        assert grad_triton[num_pairs].abs().max() == 0


@pytest.mark.parametrize("average_log_prob", [False, True])
def test_average_log_prob_and_rewards(average_log_prob):
    logits, labels, ref_logps = make_batch()
    out, _ = run(logits, labels, "triton", ref_logps=ref_logps, beta=0.1,
                 average_log_prob=average_log_prob)
    counts = (labels != -100).sum(1)
    logps = torch.cat([out.chosen_logps, out.rejected_logps])
    rewards = 0.1 * (logps - ref_logps)
    if average_log_prob:
        rewards = rewards / counts
    torch.testing.assert_close(torch.cat([out.chosen_rewards, out.rejected_rewards]), rewards)
    per_pair, _ = independent_loss(logits, labels, ref_logps=ref_logps, loss_type="sigmoid",
                                   beta=0.1, gamma=0.0, label_smoothing=0.0,
                                   average_log_prob=average_log_prob, hard=None, sft_weight=0.0)
    torch.testing.assert_close(out.per_pair_loss, per_pair, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("vocab_size", [128256, 151936, 256000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_vocabularies(vocab_size, dtype):
    logits, labels, ref_logps = make_batch(num_pairs=1, seq_len=4, vocab_size=vocab_size,
                                           dtype=dtype, seed=vocab_size)
    labels[0, -1] = vocab_size - 1  # the very last vocab entry, past the last full block
    results = [run(logits, labels, backend, ref_logps=ref_logps) for backend in ("torch", "triton")]
    torch.testing.assert_close(results[1][0].loss, results[0][0].loss, rtol=1e-5, atol=1e-5)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(results[1][1], results[0][1], rtol=tol,
                               atol=tol * results[0][1].abs().max())


def test_vocab_not_multiple_of_block_and_strided_view():
    # V = 8195 is 3 past a block multiple; logits[:, :-1] is a non-contiguous view.
    full_logits, labels, ref_logps = make_batch(seq_len=7, vocab_size=8195)
    view = full_logits[:, :-1]
    labels = labels[:, :-1].contiguous()
    labels[:, -1] = 8194
    results = [run(view, labels, backend, ref_logps=ref_logps) for backend in ("torch", "triton")]
    torch.testing.assert_close(results[1][0].loss, results[0][0].loss)
    torch.testing.assert_close(results[1][1], results[0][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_into_logits(dtype):
    logits, labels, ref_logps = make_batch(dtype=dtype)
    _, expected = run(logits, labels, "triton", ref_logps=ref_logps)
    for backend in ("triton", "torch"):
        leaf = logits.clone().requires_grad_()
        buffer = leaf * 1  # non-leaf, as logits coming out of an lm_head are
        seen = {}
        buffer.register_hook(lambda grad: seen.update(ptr=grad.data_ptr()))
        out = mixpo.preference_loss(buffer, labels, ref_logps=ref_logps, backend=backend,
                                    inplace_backward=True)
        out.loss.backward()
        assert seen["ptr"] == buffer.data_ptr()  # the gradient is the logits buffer itself
        tol = TOLERANCE[dtype] * expected.abs().max()
        torch.testing.assert_close(buffer.detach().float(), expected, rtol=0, atol=tol)
        torch.testing.assert_close(leaf.grad.float(), expected, rtol=0, atol=tol)


def test_prompt_and_padding_get_zero_gradient():
    logits, labels, ref_logps = make_batch()
    _, grad = run(logits, labels, "triton", ref_logps=ref_logps)
    assert grad[labels == -100].abs().max() == 0
    assert grad[labels != -100].abs().max() > 0


def test_metrics_use_trl_names():
    logits, labels, ref_logps = make_batch()
    out, _ = run(logits, labels, "triton", ref_logps=ref_logps, hard=torch.tensor([True, False]))
    metrics = out.metrics()
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                 "rewards/margins", "logps/chosen", "logps/rejected", "gamma/mean",
                 "gamma/std", "routing/sft_fraction"):
        assert name in metrics
    assert metrics["routing/sft_fraction"] == 0.5
    assert metrics["loss"] == pytest.approx(out.loss.item())


def test_shift_labels():
    labels = torch.tensor([[-100, 5, 6, 7]])
    assert mixpo.shift_labels(labels).tolist() == [[5, 6, 7, -100]]


def test_module_wrapper_matches_functional():
    logits, labels, ref_logps = make_batch()
    module = mixpo.PreferenceLoss(beta=0.3, loss_type="robust", label_smoothing=0.1,
                                  backend="triton")
    via_module = module(logits, labels, ref_logps=ref_logps)
    direct = mixpo.preference_loss(logits, labels, ref_logps=ref_logps, beta=0.3,
                                   loss_type="robust", label_smoothing=0.1, backend="triton")
    torch.testing.assert_close(via_module.loss, direct.loss)
