"""Logit transforms (logit_scale, softcap) and TRL's per-token metrics from the same pass, in
both front ends and both backends, against a materialised float64 reference."""
import pytest
import torch

import mixpo
from formulas import pair_losses
from mixpo.kernels import linear_logps

TRANSFORMS = [dict(logit_scale=1.0, softcap=None), dict(logit_scale=0.25, softcap=None),
              dict(logit_scale=1.0, softcap=3.0), dict(logit_scale=2.0, softcap=5.0)]


def reference_logits(z, logit_scale, softcap):
    z = z.double() * logit_scale
    return softcap * torch.tanh(z / softcap) if softcap else z


def reference_loss(z, labels, ref_logps, logit_scale, softcap):
    """(loss, summed log-probs, metrics) in float64 from materialised transformed logits."""
    logits = reference_logits(z, logit_scale, softcap)
    logprobs = torch.log_softmax(logits, -1)
    mask = labels != -100
    token = logprobs.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
    logps, counts = token.sum(1), mask.sum(1)
    _, loss = pair_losses(logps, counts.double(), ref_logps=ref_logps.double(), beta=0.5)
    b = logits.shape[0] // 2
    probs = logprobs.exp()
    entropy = -(probs * logprobs).sum(-1)
    top1 = (logits.argmax(-1) == labels).double()
    mean_logit = logits.mean(-1)
    metrics = {
        "logits/chosen": (mean_logit[:b] * mask[:b]).sum() / mask[:b].sum(),
        "logits/rejected": (mean_logit[b:] * mask[b:]).sum() / mask[b:].sum(),
        "entropy": (entropy * mask).sum() / mask.sum(),
        "mean_token_accuracy": (top1[:b] * mask[:b]).sum() / mask[:b].sum(),
    }
    return loss, logps, {k: v.item() for k, v in metrics.items()}


def make_batch(num_pairs=2, seq_len=6, hidden_size=16, vocab_size=700, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * num_pairs, seq_len, hidden_size, generator=gen)
    weight = torch.randn(vocab_size, hidden_size, generator=gen)
    labels = torch.randint(0, vocab_size, (2 * num_pairs, seq_len), generator=gen)
    labels[:, :2] = -100
    labels[1, -1] = -100
    # Make some labels the argmax so mean_token_accuracy is not trivially 0.
    logits = hidden @ weight.T
    labels[0, 3] = logits[0, 3].argmax()
    labels[1, 2] = logits[1, 2].argmax()
    ref_logps = -30 + 3 * torch.randn(2 * num_pairs, generator=gen)
    return hidden, weight, labels, ref_logps


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_front_end_transform_and_metrics(transform, backend):
    hidden, weight, labels, ref_logps = make_batch()
    raw = (hidden @ weight.T).detach()
    want_loss, want_logps, want_metrics = reference_loss(raw, labels, ref_logps, **transform)
    leaf64 = raw.double().requires_grad_()
    reference_loss(leaf64, labels, ref_logps, **transform)[0].backward()
    leaf = raw.clone().requires_grad_()
    out = mixpo.preference_loss(leaf, labels, ref_logps=ref_logps, beta=0.5, backend=backend,
                                token_metrics=True, **transform)
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([out.chosen_logps, out.rejected_logps]).double(),
                               want_logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(leaf.grad.double(), leaf64.grad, rtol=1e-4, atol=1e-6)
    metrics = out.metrics()
    for name, value in want_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
    assert 0 < metrics["mean_token_accuracy"] < 1


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_linear_front_end_transform_and_metrics(transform, backend):
    hidden, weight, labels, ref_logps = make_batch(seed=1)
    want_loss, want_logps, want_metrics = reference_loss(hidden @ weight.T, labels, ref_logps,
                                                         **transform)
    hidden64, weight64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    reference_loss(hidden64 @ weight64.T, labels, ref_logps, **transform)[0].backward()
    leaves = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = mixpo.linear_preference_loss(*leaves, labels, ref_logps=ref_logps, beta=0.5,
                                       backend=backend, token_metrics=True, **transform)
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([out.chosen_logps, out.rejected_logps]).double(),
                               want_logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(leaves[0].grad.double(), hidden64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(leaves[1].grad.double(), weight64.grad, rtol=1e-4, atol=1e-6)
    metrics = out.metrics()
    for name, value in want_metrics.items():
        assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_linear_metrics_combine_across_vocab_splits(monkeypatch):
    """On a GPU the forward splits the vocabulary for small token counts; force 4 splits under
    the interpreter and check the combined statistics (first argmax across splits too)."""
    hidden, weight, labels, _ = make_batch(vocab_size=4 * 8192 + 100, seed=2)
    weight[3 * 8192 + 5] = weight[5]         # a tie for the max across splits: first one wins
    monkeypatch.setattr(linear_logps, "_forward_slots", lambda *args: 64)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    rows = torch.nonzero(labels.reshape(-1) != -100).squeeze(1)
    row_labels = labels.reshape(-1)[rows]
    row_labels[0] = 5
    for transform in (dict(), dict(logit_scale=1.5, softcap=4.0)):
        logps, lse, aux = linear_logps.linear_token_logps_forward(
            hidden2d, weight, None, row_labels, rows, stats=True, **transform)
        logits = reference_logits(hidden2d[rows] @ weight.T, transform.get("logit_scale", 1.0),
                                  transform.get("softcap"))
        logprobs = torch.log_softmax(logits, -1)
        torch.testing.assert_close(lse.double(), torch.logsumexp(logits, -1), rtol=1e-5,
                                   atol=1e-5)
        torch.testing.assert_close(logps.double(), logprobs.gather(-1, row_labels[:, None])[:, 0],
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(aux["entropy"].double(), -(logprobs.exp() * logprobs).sum(-1),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(aux["mean_logit"].double(), logits.mean(-1), rtol=1e-4,
                                   atol=1e-5)
        torch.testing.assert_close(aux["log_sum_sq"].double(),
                                   torch.logsumexp(2 * logprobs, -1), rtol=1e-4, atol=1e-5)
        assert torch.equal(aux["top1"].bool(), logits.argmax(-1) == row_labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma2_sized_vocab_with_softcap(dtype):
    """V = 256000 (Gemma-2) with its final softcap 30, few tokens: the transformed path on a
    large vocabulary, Triton (interpreted) vs twin, and vs float64."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 3, 16, generator=gen).to(dtype)
    weight = (2 * torch.randn(256000, 16, generator=gen)).to(dtype)
    labels = torch.tensor([[-100, 7, 255999], [-100, 123456, -100]])
    results = {}
    for backend in ("torch", "triton"):
        leaves = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = mixpo.linear_preference_loss(*leaves, labels, beta=0.5, softcap=30.0,
                                           backend=backend, ref_logps=torch.tensor([-20., -15.]))
        out.loss.backward()
        results[backend] = (out.loss.detach(), leaves[0].grad.float(), leaves[1].grad.float())
    # Gradients sum 256000 vocab terms in another order (fp32 atomics vs chunked matmuls).
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max())
    want_loss, _, _ = reference_loss(hidden.float() @ weight.float().T, labels,
                                     torch.tensor([-20., -15.]), 1.0, 30.0)
    torch.testing.assert_close(results["triton"][0].double(), want_loss,
                               rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)


def test_sequence_logps_with_transform_and_ld_alpha():
    hidden, weight, labels, _ = make_batch(seed=4)
    logits = reference_logits(hidden @ weight.T, 0.5, 2.0)
    token = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    mask = labels != -100
    for backend in ("torch", "triton"):
        got = mixpo.sequence_logps(hidden, weight, labels, logit_scale=0.5, softcap=2.0,
                                   backend=backend)
        torch.testing.assert_close(got.double(), (token * mask).sum(1), rtol=1e-5, atol=1e-5)
        weighted = mixpo.sequence_logps(hidden, weight, labels, logit_scale=0.5, softcap=2.0,
                                        ld_alpha=0.5, backend=backend)
        counts = mask.sum(1)
        shared = torch.minimum(counts[:2], counts[2:]).repeat(2)
        weights = torch.where(mask.cumsum(1) <= shared[:, None], 1.0, 0.5) * mask
        torch.testing.assert_close(weighted.double(), (token * weights).sum(1), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transform", TRANSFORMS[:3])
def test_masked_minus_inf_logits_give_finite_gradients(dtype, transform):
    """A -inf logit (a vocabulary entry masked out, never the label) has probability 0: its
    gradient is 0 and the entropy counts 0 log 0 as 0, in the Triton kernel (interpreter) and
    its torch twin alike, against float64 on the same logits."""
    from mixpo.kernels import logits_logps, logits_logps_torch

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 300).to(dtype)
    labels = torch.randint(0, 300, (2, 5))
    labels[0, 0] = -100
    logits[:, :, 7] = float("-inf")                 # masked everywhere
    labels[labels == 7] = 8
    coef = torch.randn(2, 5)
    z = reference_logits(logits.double(), **transform)
    logprobs = torch.log_softmax(z, -1)
    probs = logprobs.exp()
    active = (labels != -100)[..., None]
    slope = transform["logit_scale"] * (1 - (z / transform["softcap"]) ** 2) \
        if transform["softcap"] else transform["logit_scale"]
    expected = coef.double()[..., None] * (torch.nn.functional.one_hot(
        labels.clamp(min=0), 300) - probs) * slope * active
    entropy = -torch.where(probs > 0, probs * logprobs, 0.0).sum(-1) * active[..., 0]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for kernels in (logits_logps, logits_logps_torch):
        _, lse, stats = kernels.token_logps_forward(logits, labels, stats=True, **transform)
        grad = kernels.token_logps_backward(logits, labels, lse, coef, **transform)
        assert torch.isfinite(grad).all() and torch.isfinite(stats["entropy"]).all()
        assert (grad[..., 7] == 0).all()
        torch.testing.assert_close(grad.double(), expected, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(stats["entropy"].double(), entropy, atol=1e-4, rtol=1e-4)
