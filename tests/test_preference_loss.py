"""preference_loss: Triton kernels (interpreted on CPU) vs the torch twin vs formulas written
independently here with log_softmax + autograd."""

import pytest
import torch

import mixpo
from formulas import pair_losses, sequence_logps_from_logits

from mixpo.loss_spec import LOSS_TYPES, MARGIN, SORTED

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
# exo_pair needs label smoothing; the others that accept it get 0.1.
SMOOTHED = {name for name, spec in LOSS_TYPES.items() if spec.label_smoothing}


def independent_loss(logits, labels, logit_scale=1.0, softcap=None, **kwargs):
    """(per-pair losses, loss, summed log-probs) from log_softmax + the written-out formulas."""
    logps, counts = sequence_logps_from_logits(logits, labels, logit_scale=logit_scale,
                                               softcap=softcap)
    per_pair, loss = pair_losses(logps, counts.float(), **kwargs)
    return per_pair, loss, logps


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


def loss_kwargs(loss_type, ref_logps, routing):
    spec = LOSS_TYPES[loss_type]
    return dict(loss_type=loss_type, beta=0.5,
                ref_logps=None if spec.reference_free else ref_logps,
                label_smoothing=0.1 if loss_type in SMOOTHED else 0.0,
                hard=torch.tensor([True, False]) if routing else None,
                sft_weight=0.2 if routing else 0.0)


def margin_call(margin_kind):
    if margin_kind == "scalar":
        return {"gamma": 0.3}
    if margin_kind == "per_pair":
        return {"gamma": torch.tensor([0.1, 0.7])}
    if margin_kind == "adaptive":  # fresh, identically seeded solvers: the same sample
        return {"margin": mixpo.AdaptiveMargin(0.5, 5.0, seed=3)}
    return {}


def compare_backends_and_formulas(logits, labels, kwargs, call, dtype):
    """Triton (interpreted) vs twin vs the independent formulas: loss, per-pair losses,
    log-probs and d loss / d logits."""
    num_pairs = logits.shape[0] // 2
    outputs = {backend: run(logits, labels, backend, **kwargs, **call())
               for backend in ("torch", "triton")}
    (out_torch, grad_torch), (out_triton, grad_triton) = outputs["torch"], outputs["triton"]
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out_triton.loss, out_torch.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_triton.per_pair_loss, out_torch.per_pair_loss, rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(out_triton.chosen_logps, out_torch.chosen_logps,
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad_triton, grad_torch, rtol=tol, atol=tol * grad_torch.abs().max())
    assert out_triton.per_pair_loss.shape == (num_pairs,)
    # Independent formulas, with the gamma the solver actually produced.
    leaf = logits.clone().requires_grad_()
    formula_kwargs = {k: v for k, v in kwargs.items() if k not in ("ref_logps",)}
    if "margin" in call() or "gamma" in call():
        formula_kwargs["gamma"] = out_triton.gamma
    per_pair, loss, logps = independent_loss(leaf, labels, ref_logps=kwargs.get("ref_logps"),
                                             **formula_kwargs)
    loss.backward()
    torch.testing.assert_close(out_triton.per_pair_loss, per_pair.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_triton.loss, loss.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_triton.chosen_logps, logps[:num_pairs].detach(),
                               rtol=1e-5, atol=1e-3)
    expected_grad = leaf.grad.float()
    torch.testing.assert_close(grad_triton, expected_grad, rtol=tol,
                               atol=tol * expected_grad.abs().max())
    return out_triton, grad_triton


MARGIN_TYPES = [name for name, spec in LOSS_TYPES.items() if spec.family == MARGIN]
OTHER_TYPES = [name for name, spec in LOSS_TYPES.items() if spec.family != MARGIN]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CASES = ([(name, torch.float32, routing, kind) for name in MARGIN_TYPES
          for routing in (False, True) for kind in ("scalar", "per_pair", "adaptive")]
         + [(name, dtype, routing, "scalar") for name in MARGIN_TYPES
            for dtype in DTYPES[1:] for routing in (False, True)]
         + [(name, dtype, routing, "none") for name in OTHER_TYPES for dtype in DTYPES
            for routing in ((False,) if LOSS_TYPES[name].family == SORTED else (False, True))])


@pytest.mark.parametrize("loss_type,dtype,routing,margin_kind", CASES)
def test_triton_matches_torch_and_formulas(loss_type, dtype, routing, margin_kind):
    logits, labels, ref_logps = make_batch(dtype=dtype)
    num_pairs = logits.shape[0] // 2
    kwargs = loss_kwargs(loss_type, ref_logps, routing)
    _, grad = compare_backends_and_formulas(logits, labels, kwargs,
                                            lambda: margin_call(margin_kind), dtype)
    if routing:  # a hard pair's rejected response gets no gradient
        assert grad[num_pairs].abs().max() == 0


OPTION_CASES = {
    "mpo_mixture": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "rpo": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "wpo": dict(loss_type="sigmoid", use_weighting=True),
    "forward_kl": dict(loss_type="sigmoid", f_divergence_type="forward_kl"),
    "js_divergence": dict(loss_type="hinge", f_divergence_type="js_divergence"),
    "alpha_divergence": dict(loss_type="ipo", f_divergence_type="alpha_divergence",
                             f_alpha_divergence_coef=0.3),
    "rdpo": dict(loss_type="sigmoid", rdpo_alpha=0.05),
    "dpop": dict(loss_type="sigmoid", dpop_lambda=2.0),
    "summed_ipo": dict(loss_type="ipo", average_log_prob=False),        # MixDPO's ipo-sft
    "per_token_sigmoid": dict(loss_type="sigmoid", average_log_prob=True),
    "pair_nll": dict(loss_type="cpo", nll_normalization="pair", cpo_alpha=0.5),
    "discopop_tau": dict(loss_type="discopop", discopop_tau=0.2),
}


@pytest.mark.parametrize("name", sorted(OPTION_CASES))
@pytest.mark.parametrize("routing", [False, True])
def test_trl_options_match_formulas(name, routing):
    logits, labels, ref_logps = make_batch(seed=7)
    options = dict(OPTION_CASES[name])
    reference_free = LOSS_TYPES[options["loss_type"] if isinstance(options["loss_type"], str)
                                else options["loss_type"][0]].reference_free
    kwargs = dict(beta=0.5, ref_logps=None if reference_free else ref_logps,
                  hard=torch.tensor([True, False]) if routing else None, **options)
    if options.pop("use_weighting", False):
        # WPO's weights come from the policy's next-token distributions: the oracle gets
        # them from log_softmax (log sum_v p^2 per token).
        z = torch.log_softmax(logits.float(), -1)
        mask = labels != -100
        per_token = z.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) \
            - torch.logsumexp(2 * z, -1)
        weight = torch.exp((per_token * mask).sum(1) / mask.sum(1))
        outputs = {backend: run(logits, labels, backend, **kwargs) for backend in
                   ("torch", "triton")}
        leaf = logits.clone().requires_grad_()
        formula_kwargs = {k: v for k, v in kwargs.items()
                          if k not in ("ref_logps", "use_weighting")}
        _, loss, _ = independent_loss(leaf, labels, ref_logps=kwargs["ref_logps"],
                                      weights=weight[:2] * weight[2:], **formula_kwargs)
        loss.backward()
        for out, grad in outputs.values():
            torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grad, leaf.grad, rtol=1e-5, atol=1e-6)
        return
    compare_backends_and_formulas(logits, labels, kwargs, dict, torch.float32)


def test_ld_alpha_weights_the_longer_response_beyond_the_shared_length():
    logits, labels, ref_logps = make_batch(num_pairs=2, seq_len=8, seed=3)
    labels[0, 1:] = torch.randint(0, 300, (7,))     # chosen 0: 7 tokens, rejected 0: fewer
    alpha = 0.4
    for backend in ("torch", "triton"):
        out, grad = run(logits, labels, backend, ref_logps=ref_logps, beta=0.5, ld_alpha=alpha)
        # The oracle: per-token log-probs weighted by hand.
        z = torch.log_softmax(logits.float(), -1)
        leaf = logits.clone().requires_grad_()
        z = torch.log_softmax(leaf.float(), -1)
        mask = labels != -100
        token = z.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * mask
        counts = mask.sum(1)
        shared = torch.minimum(counts[:2], counts[2:]).repeat(2)
        rank = mask.cumsum(1)
        weights = torch.where(rank <= shared[:, None], 1.0, alpha) * mask
        weighted = (token * weights).sum(1)
        _, loss = pair_losses(weighted, counts.float(), ref_logps=ref_logps, beta=0.5)
        loss.backward()
        torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out.chosen_logps, weighted[:2].detach(), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(weighted, token.sum(1))   # the weighting did something


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
    per_pair, _, _ = independent_loss(logits, labels, ref_logps=ref_logps, loss_type="sigmoid",
                                      beta=0.1, gamma=0.0, average_log_prob=average_log_prob)
    torch.testing.assert_close(out.per_pair_loss, per_pair, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_type,summed", [("ipo", True), ("sigmoid_norm", True),
                                              ("sigmoid", True), ("simpo", False),
                                              ("orpo", False)])
def test_reported_rewards_follow_trl(loss_type, summed):
    # TRL's DPOTrainer reports beta * (logp - ref) summed for every type, ipo and
    # sigmoid_norm included (their losses are per token); SimPO / ORPO report per token.
    logits, labels, ref_logps = make_batch()
    reference_free = LOSS_TYPES[loss_type].reference_free
    out, _ = run(logits, labels, "triton", ref_logps=None if reference_free else ref_logps,
                 loss_type=loss_type, beta=0.1)
    counts = (labels != -100).sum(1)
    logps = torch.cat([out.chosen_logps, out.rejected_logps])
    rewards = 0.1 * (logps - (0 if reference_free else ref_logps))
    if not summed:
        rewards = rewards / counts
    torch.testing.assert_close(torch.cat([out.chosen_rewards, out.rejected_rewards]), rewards)


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
