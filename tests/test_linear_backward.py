"""The logit-free backward and the one-pass loss: the GEMM backward (Triton under the
interpreter, and its torch twin) and the atomic alternative against float64 autograd, bitwise
reproducibility, vocab-chunk and pair-group boundaries, CCE's gradient filter on a Zipf-like
head, and one pass == two passes for every loss type whose gradient coefficient is per pair."""
import logging

import pytest
import torch

import mixpo
from formulas import pair_losses
from mixpo import functions
from mixpo.functions import plan_linear_passes
from mixpo.kernels import linear_logps, linear_logps_atomic
from mixpo.kernels import linear_logps_torch as twin
from mixpo.loss_config import LossConfig

IGNORE = -100
BLOCK_V = linear_logps.choose("linear_softmax_grad", dtype=torch.float32,
                              num_tokens=1).block("BLOCK_V")
RELATIVE = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}


def relative_error(got, want):
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def problem(num_rows=90, num_tokens=70, hidden_size=32, vocab_size=2 * BLOCK_V + 300,
            dtype=torch.float32, bias=True, seed=0):
    """hidden [N, H], weight [V, H], bias [V], labels [n] (first and last vocab entries
    among them), rows [n] (a random subset of hidden's rows), coefficients [n] with a whole
    zero token tile (the first 64, as MixDPO's routed rejected responses) and scattered
    zeros."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_rows, hidden_size, generator=gen).to(dtype)
    weight = (3 * torch.randn(vocab_size, hidden_size, generator=gen)
              / hidden_size**0.5).to(dtype)
    bias_t = torch.randn(vocab_size, generator=gen).to(dtype) if bias else None
    rows = torch.randperm(num_rows, generator=gen)[:num_tokens]
    labels = torch.randint(0, vocab_size, (num_tokens,), generator=gen)
    labels[-3:] = torch.tensor([0, BLOCK_V % vocab_size, vocab_size - 1])  # chunk edges
    coef = torch.randn(num_tokens, generator=gen)
    coef[:64] = 0.0
    coef[num_tokens // 2 + 2:][:1] = 0.0
    return hidden, weight, bias_t, labels, rows, coef


def float64_grads(hidden, weight, bias, labels, rows, coef, logit_scale=1.0, softcap=None):
    """Gradients of sum(coef * token log-prob) by float64 autograd on materialised logits."""
    leaves = [None if t is None else t.detach().double().requires_grad_()
              for t in (hidden, weight, bias)]
    logits = leaves[0][rows] @ leaves[1].T + (0 if bias is None else leaves[2])
    logits = softcap * torch.tanh(logit_scale * logits / softcap) if softcap \
        else logit_scale * logits
    token = torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0]
    (token * coef.double()).sum().backward()
    return [None if leaf is None else leaf.grad for leaf in leaves], token.detach()


BACKWARDS = {
    "triton_gemm": lambda *args, **kw: linear_logps.linear_token_logps_backward(*args, **kw),
    "triton_atomic": lambda *args, workspace_bytes=None, **kw:
        linear_logps.linear_token_logps_backward(*args, method="atomic", **kw),
    # The vocabulary sorted by mean logit, 16-bit dWeight in two fp32 chunks (8192 + 300).
    "triton_atomic_sorted": lambda *args, workspace_bytes=None, **kw:
        linear_logps.linear_token_logps_backward(*args, method="atomic", vocab_sorted=True,
                                                 vocab_chunk=1, **kw),
    "torch": lambda *args, **kw: twin.linear_token_logps_backward(*args, **kw),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transform", [{}, {"logit_scale": 0.7, "softcap": 30.0}])
def test_backward_variants_vs_float64(dtype, transform):
    """Every backward, three vocab chunks (the last partial: V is not a multiple of the
    block), fp32 and bf16, with and without the logit transform, against float64."""
    hidden, weight, bias, labels, rows, coef = problem(dtype=dtype)
    want, token = float64_grads(hidden, weight, bias, labels, rows, coef, **transform)
    _, lse, aux = twin.linear_token_logps_forward(hidden, weight, bias, labels, rows,
                                                  **transform)
    # Workspace of one vocab block: chunk boundaries at BLOCK_V and 2 BLOCK_V.
    workspace = rows.shape[0] * BLOCK_V * (4 if dtype == torch.float32 else 2)
    for name, backward in BACKWARDS.items():
        got = backward(hidden, weight, bias, labels, rows, lse, coef, aux["label_logit"],
                       workspace_bytes=workspace, **transform)
        for grad_name, value, expected in zip(("dhidden", "dweight", "dbias"), got, want):
            assert value.dtype == dtype and value.shape == expected.shape
            error = relative_error(value, expected)
            assert error < RELATIVE[dtype], (name, grad_name, error)
        not_listed = torch.ones(hidden.shape[0], dtype=torch.bool)
        not_listed[rows] = False
        assert got[0][not_listed].abs().max() == 0, name
        # Tokens with a zero coefficient get no gradient.
        assert got[0][rows[coef == 0]].abs().max() == 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemm_backward_is_bitwise_reproducible(dtype):
    """No atomics: two backward runs give bit-identical gradients (Triton under the
    interpreter and the torch twin), and the chunking only moves rounding."""
    hidden, weight, bias, labels, rows, coef = problem(dtype=dtype, seed=1)
    _, lse, _ = twin.linear_token_logps_forward(hidden, weight, bias, labels, rows)
    for backward in (linear_logps.linear_token_logps_backward,
                     twin.linear_token_logps_backward):
        first = backward(hidden, weight, bias, labels, rows, lse, coef, workspace_bytes=1)
        second = backward(hidden, weight, bias, labels, rows, lse, coef, workspace_bytes=1)
        for a, b in zip(first, second):
            assert torch.equal(a, b)
        whole = backward(hidden, weight, bias, labels, rows, lse, coef)     # one chunk
        for a, b in zip(first, whole):
            assert relative_error(a, b) < RELATIVE[dtype]


def test_workspace_sizes_the_vocab_chunks():
    # Llama-3 shape, 12,288 bf16 tokens: 256 MiB holds 10,922 columns, 10,880 in 128-tiles.
    assert twin.vocab_chunk_rows(12288, 128256, 2, 128) == 10880
    assert twin.vocab_chunk_rows(12288, 128256, 2, 128, workspace_bytes=1) == 128
    assert twin.vocab_chunk_rows(16, 1000, 4, 128) == 1000
    with pytest.raises(ValueError, match="method"):
        hidden, weight, bias, labels, rows, coef = problem(num_tokens=8, vocab_size=300)
        linear_logps.linear_token_logps_backward(hidden, weight, bias, labels, rows,
                                                 coef, coef, method="dense")


def zipf_head(num_tokens=64, hidden_size=64, vocab_size=3 * 8192, alpha=1.5, seed=0):
    """A trained-looking head: logit of vocab entry v about -alpha log(v + 1) + noise, so the
    softmax is Zipf(alpha)-like and most of the vocabulary sits far below bf16 resolution."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen)
    hidden[:, 0] = 1.0
    weight = torch.randn(vocab_size, hidden_size, generator=gen) * 0.2
    weight[:, 0] = -alpha * torch.log(torch.arange(vocab_size, dtype=torch.float32) + 1) * 2
    labels = torch.randint(0, 64, (num_tokens,), generator=gen)
    return hidden, weight, labels


def test_cce_filter_skips_tiles_below_bf16_resolution():
    """CCE's per-element rule on the atomic backward: on a Zipf-like head (fp32 data, the
    bf16 threshold 2^-12), tiles whose every |onehot - softmax| < 2^-12 skip both products;
    the gradient moves by less than bf16 rounding (2^-8 relative) and the kept-tile counter
    shows the skipping."""
    hidden, weight, labels = zipf_head()
    rows = torch.arange(hidden.shape[0])
    coef = torch.ones(rows.shape[0])
    _, lse, _ = twin.linear_token_logps_forward(hidden, weight, None, labels, rows)
    exact_kept, filtered_kept = torch.zeros(1, dtype=torch.int32), \
        torch.zeros(1, dtype=torch.int32)
    exact = linear_logps_atomic.linear_token_logps_backward_atomic(
        hidden, weight, None, labels, rows, lse, coef, kept=exact_kept)
    filtered = linear_logps_atomic.linear_token_logps_backward_atomic(
        hidden, weight, None, labels, rows, lse, coef, filter_eps=2.0**-12, kept=filtered_kept)
    assert linear_logps_atomic.filter_threshold("auto", torch.bfloat16) == 2.0**-12
    assert linear_logps_atomic.filter_threshold("auto", torch.float32) == 2.0**-28
    assert exact_kept.item() == 3 and filtered_kept.item() == 1     # 3 vocab tiles of 8192
    for got, want in zip(filtered[:2], exact[:2]):
        assert 0 < relative_error(got, want) < 2.0**-8
    with pytest.raises(ValueError, match="atomic"):
        linear_logps.linear_token_logps_backward(hidden, weight, None, labels, rows, lse, coef,
                                                 filter_eps="auto")


def test_sorted_vocabulary_lets_the_filter_skip_scattered_rare_entries():
    """The Zipf-like head with its vocabulary shuffled, so frequent entries sit in every
    tile: unsorted, the filter keeps all 3 tiles; over the vocabulary sorted by mean logit
    (`vocab_sorted`, CCE's sorting) it keeps 1, with the gradient still within bf16 rounding
    of the exact one. Unfiltered, sorting changes only the order of the additions."""
    hidden, weight, labels = zipf_head()
    shuffle = torch.randperm(weight.shape[0], generator=torch.Generator().manual_seed(3))
    weight, labels = weight[shuffle], torch.argsort(shuffle)[labels]
    rows = torch.arange(hidden.shape[0])
    coef = torch.ones(rows.shape[0])
    _, lse, _ = twin.linear_token_logps_forward(hidden, weight, None, labels, rows)
    order = linear_logps_atomic.vocab_order(hidden, weight, None, rows)
    assert order.dtype == torch.int32 and torch.equal(order.sort().values,
                                                      torch.arange(weight.shape[0]).int())
    exact = linear_logps_atomic.linear_token_logps_backward_atomic(
        hidden, weight, None, labels, rows, lse, coef)
    kept = {}
    for sort in (False, True):
        kept[sort] = torch.zeros(1, dtype=torch.int32)
        filtered = linear_logps_atomic.linear_token_logps_backward_atomic(
            hidden, weight, None, labels, rows, lse, coef, filter_eps=2.0**-12,
            kept=kept[sort], vocab_sorted=sort)
        for got, want in zip(filtered[:2], exact[:2]):
            assert relative_error(got, want) < 2.0**-8
    assert kept[False].item() == 3 and kept[True].item() == 1
    sorted_exact = linear_logps_atomic.linear_token_logps_backward_atomic(
        hidden, weight, None, labels, rows, lse, coef, vocab_sorted=True)
    for got, want in zip(sorted_exact[:2], exact[:2]):
        assert relative_error(got, want) < 1e-6
    with pytest.raises(ValueError, match="vocab_sorted belong to the atomic backward"):
        linear_logps.linear_token_logps_backward(hidden, weight, None, labels, rows, lse, coef,
                                                 vocab_sorted=True)


# ----------------------------------------------------------------------------------------------
# One pass == two passes
# ----------------------------------------------------------------------------------------------
def batch(num_pairs=3, seq_len=14, hidden_size=24, vocab_size=700, dtype=torch.float32, seed=0):
    """hidden [2B, T, H], weight, bias, labels with ragged prompts and padding, ref_logps."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * num_pairs, seq_len, hidden_size, generator=gen).to(dtype)
    weight = (2 * torch.randn(vocab_size, hidden_size, generator=gen)
              / hidden_size**0.5).to(dtype)
    bias = torch.randn(vocab_size, generator=gen).to(dtype)
    labels = torch.randint(0, vocab_size, (2 * num_pairs, seq_len), generator=gen)
    for row in range(2 * num_pairs):
        labels[row, :2 + row % 4] = IGNORE              # prompts
        labels[row, seq_len - row % 3:] = IGNORE        # padding
    ref = -torch.rand(2 * num_pairs, generator=gen) * 20 - 60
    return hidden, weight, bias, labels, ref


PER_PAIR_TYPES = [
    ("sigmoid", dict(label_smoothing=0.1, gamma=torch.tensor([0.1, 0.3, 0.0]))),
    ("robust", dict(label_smoothing=0.2)),
    ("hinge", dict(average_log_prob=True)),
    ("ipo", dict(hard=torch.tensor([False, True, False]))),
    ("exo_pair", dict(label_smoothing=0.1)),
    ("discopop", {}),
    ("sigmoid_norm", {}),
    ("simpo", dict(gamma=0.5)),
    ("cpo", dict(cpo_alpha=0.5)),
    ("nca_pair", {}),
    ("bco_pair", {}),
    ("sppo_hard", {}),
    ("apo_zero", {}),
    ("apo_down", {}),
    ("orpo", {}),
    ("sft", {}),
    ("sigmoid", dict(hard=torch.tensor([True, False, False]), sft_weight=0.3)),
    ("sigmoid", dict(sft_weight=0.5, nll_normalization="pair")),
    ("sigmoid", dict(ld_alpha=0.5, rdpo_alpha=0.01, dpop_lambda=0.5)),
    ("sigmoid", dict(use_weighting=True, token_metrics=True)),
    ("sigmoid", dict(f_divergence_type="alpha_divergence")),
    (["sigmoid", "sft"], dict(loss_weights=[1.0, 0.5])),
    ("sigmoid", dict(logit_scale=0.7, softcap=20.0)),
]
REFERENCE_FREE = ("simpo", "cpo", "orpo")


def run(backend, passes, hidden, weight, bias, labels, ref, workspace_bytes=None, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    out = mixpo.linear_preference_loss(*leaves[:2], labels, bias=leaves[2], ref_logps=ref,
                                       beta=0.3, backend=backend, passes=passes,
                                       workspace_bytes=workspace_bytes, **kwargs)
    out.loss.backward()
    return out, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("workspace_tokens", [2 * 28, 10], ids=["2-pairs", "recompute"])
@pytest.mark.parametrize("loss_type,extra", PER_PAIR_TYPES,
                         ids=[f"{t}-{'-'.join(e) or 'plain'}" for t, e in PER_PAIR_TYPES])
def test_one_pass_equals_two_passes(loss_type, extra, workspace_tokens):
    """Torch backend, fp32. A workspace of 2 pairs' logits: two groups (a group boundary
    between pairs 1 and 2); of 10 tokens (pairs hold 14-24): every pair recomputes the
    logits of its tokens before its last block, in blocks mixing pairs. Loss, per-pair
    losses, log-probs, metrics and gradients equal."""
    hidden, weight, bias, labels, ref = batch()
    name = loss_type if isinstance(loss_type, str) else loss_type[0]
    ref = None if name in REFERENCE_FREE else ref
    workspace = workspace_tokens * 700 * 4
    kwargs = dict(loss_type=loss_type, **extra)
    one, one_grads = run("torch", 1, hidden, weight, bias, labels, ref, workspace, **kwargs)
    two, two_grads = run("torch", 2, hidden, weight, bias, labels, ref, workspace, **kwargs)
    # fp32 rounding apart: the one pass's label log-prob is log(p_y) of ATen's softmax, the
    # two passes' z_y - lse (both within 1e-6 per token of float64).
    torch.testing.assert_close(one.loss, two.loss, rtol=5e-6, atol=1e-7)
    torch.testing.assert_close(one.per_pair_loss, two.per_pair_loss, rtol=5e-6, atol=1e-7)
    torch.testing.assert_close(one.chosen_logps, two.chosen_logps, rtol=1e-6, atol=1e-6)
    for key, value in two.metrics().items():
        assert one.metrics()[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for got, want in zip(one_grads, two_grads):
        assert relative_error(got, want) < 1e-5


def float64_reference(hidden, weight, bias, labels, ref, **kwargs):
    """(loss, [dhidden, dweight, dbias]) of the DPO-family loss by float64 autograd."""
    leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    logits = leaves[0] @ leaves[1].T + leaves[2]
    token = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    logps = (token * (labels != IGNORE)).sum(-1)
    _, expected = pair_losses(logps, (labels != IGNORE).sum(-1).double(),
                              ref_logps=ref.double(), beta=0.3, **kwargs)
    expected.backward()
    return expected, [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_triton_backend_vs_float64(dtype):
    """The Triton backend's one pass (torch GEMMs, Triton pair epilogue) against the
    two-pass Triton path and float64 autograd, MixDPO routing and margins on; bf16 with
    passes=1 over several groups accumulates dWeight in fp32."""
    hidden, weight, bias, labels, ref = batch(dtype=dtype, seed=1)
    kwargs = dict(loss_type="sigmoid", hard=torch.tensor([False, True, False]),
                  gamma=torch.tensor([0.2, 0.0, 0.5]), sft_weight=0.2)
    workspace = 2 * 28 * 700 * 4
    one, one_grads = run("triton", 1, hidden, weight, bias, labels, ref, workspace, **kwargs)
    two, two_grads = run("triton", 2, hidden, weight, bias, labels, ref, workspace, **kwargs)
    expected, expected_grads = float64_reference(hidden, weight, bias, labels, ref, **kwargs)
    for out in (one, two):
        assert abs(out.loss.item() - expected.item()) < 1e-4
    for got, two_grad, want in zip(one_grads, two_grads, expected_grads):
        assert relative_error(got, two_grad) < RELATIVE[dtype]
        assert relative_error(got, want) < RELATIVE[dtype]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_pass_recomputing_vs_float64(backend, dtype):
    """passes=1 in a workspace of 10 tokens (pairs hold 14-24): recomputed blocks on both
    backends; bf16 accumulates dWeight in fp32 over the blocks. Against float64 autograd,
    and two runs bit-equal."""
    hidden, weight, bias, labels, ref = batch(dtype=dtype, seed=2)
    kwargs = dict(loss_type="sigmoid", hard=torch.tensor([False, True, False]), sft_weight=0.2)
    workspace = 10 * 700 * 4
    one, grads = run(backend, 1, hidden, weight, bias, labels, ref, workspace, **kwargs)
    expected, expected_grads = float64_reference(hidden, weight, bias, labels, ref, **kwargs)
    assert abs(one.loss.item() - expected.item()) < 1e-4 * max(1.0, abs(expected.item()))
    for got, want in zip(grads, expected_grads):
        assert relative_error(got, want) < RELATIVE[dtype]
    again, grads_again = run(backend, 1, hidden, weight, bias, labels, ref, workspace, **kwargs)
    assert torch.equal(one.loss, again.loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_again))


def test_one_pass_exact_when_the_label_probability_leaves_fp32():
    """Labels far below the row maximum (log-prob < -87: the label's softmax probability is
    subnormal or 0 in fp32): the CPU paths (one pass, two passes' forward) recompute those
    rows' log-sum-exp exactly, so the log-probs and gradients still match float64."""
    hidden, weight, bias, labels, ref = batch(seed=3)
    hidden = hidden * 12                                   # logits spread over hundreds
    logits = hidden @ weight.T + bias
    least = logits.argmin(-1)
    labels = torch.where(labels == IGNORE, labels, least)  # every label the least likely
    token = torch.log_softmax(logits.double(), -1).gather(-1, least[..., None])[..., 0]
    assert token[labels != IGNORE].max() < -87
    ref = ref * 100
    kwargs = dict(loss_type="sigmoid")
    one, grads = run("torch", 1, hidden, weight, bias, labels, ref, **kwargs)
    two, _ = run("torch", 2, hidden, weight, bias, labels, ref, **kwargs)
    expected, expected_grads = float64_reference(hidden, weight, bias, labels, ref, **kwargs)
    logps = (token * (labels != IGNORE)).sum(-1)
    for out in (one, two):                 # the one pass, and the two passes' forward
        assert relative_error(torch.cat([out.chosen_logps, out.rejected_logps]), logps) < 1e-6
    assert torch.isfinite(one.loss) and abs(one.loss.item() - two.loss.item()) < 1e-4
    for got, want in zip(grads, expected_grads):
        assert relative_error(got, want) < 1e-5


def test_pass_choice_is_automatic_and_logged(caplog, monkeypatch):
    monkeypatch.setattr(functions, "_LOGGED", set())          # logged once per process
    hidden, weight, bias, labels, ref = batch()
    config = LossConfig(loss_type="sigmoid")
    rows = torch.nonzero(labels.reshape(-1) != IGNORE).squeeze(1)
    sequences = rows // labels.shape[1]
    counts = (labels != IGNORE).sum(1).float()
    plan = lambda cfg, **kw: plan_linear_passes(  # noqa: E731
        cfg, kw.pop("margin", None), kw.pop("passes", "auto"), kw.pop("weight", weight),
        rows.shape[0], sequences, counts, **kw)
    with caplog.at_level(logging.INFO, logger="mixpo.functions"):
        groups = plan(config)
        assert len(groups) == 1 and torch.equal(torch.sort(groups[0][1]).values,
                                                torch.arange(rows.shape[0]))
        assert "one pass" in caplog.text
        caplog.clear()
        plan(config)
        assert "one pass" not in caplog.text                      # once only
        # A workspace of one pair's logits: three groups, pair by pair.
        groups = plan(config, workspace_bytes=28 * 700 * 4)
        assert [pairs.tolist() for pairs, _ in groups] == [[0], [1], [2]]
        assert plan(LossConfig(loss_type="aot")) is None and "aot" in caplog.text
        assert plan(config, margin=mixpo.AdaptiveMargin(gamma0=0.5, tau=1.0)) is None
        assert plan(config, passes=2) is None
        # Smaller than a pair: one pair per group, the tokens before each pair's last
        # workspace block recomputed (fp32 weights; auto or forced).
        assert len(plan(config, workspace_bytes=1)) == 3 and "recompute 56 of 59" in caplog.text
        assert len(plan(config, workspace_bytes=1, passes=1)) == 3
        # 16-bit weights: one pass only if the whole batch fits one group.
        assert plan(config, weight=weight.bfloat16(), workspace_bytes=28 * 700 * 4) is None
        assert len(plan(config, weight=weight.bfloat16())) == 1
    with pytest.raises(ValueError, match="per-pair"):
        plan(LossConfig(loss_type="aot"), passes=1)
    with pytest.raises(ValueError, match="passes"):
        plan(config, passes=3)
    with pytest.raises(ValueError, match="workspace_bytes"):
        mixpo.linear_preference_loss(hidden, weight, labels, ref_logps=ref, workspace_bytes=0)


def test_one_pass_backward_runs_once():
    hidden, weight, bias, labels, ref = batch()
    out, _ = run("torch", 1, hidden, weight, bias, labels, ref)
    with pytest.raises(RuntimeError):
        out.loss.backward()


@pytest.mark.parametrize("passes", [1, 2])
def test_frozen_head_skips_the_weight_gradient(passes):
    """A head without requires_grad: no dWeight GEMM, the same dHidden; under no_grad the
    loss runs forward only (no one-pass gradients computed)."""
    hidden, weight, bias, labels, ref = batch()
    trained, trained_grads = run("torch", passes, hidden, weight, bias, labels, ref)
    leaf = hidden.detach().clone().requires_grad_()
    out = mixpo.linear_preference_loss(leaf, weight, labels, bias=bias, ref_logps=ref,
                                       beta=0.3, backend="torch", passes=passes)
    out.loss.backward()
    torch.testing.assert_close(out.loss, trained.loss)
    torch.testing.assert_close(leaf.grad, trained_grads[0], rtol=1e-6, atol=1e-8)
    assert weight.grad is None
    with torch.no_grad():
        evaluated = mixpo.linear_preference_loss(hidden, weight, labels, bias=bias,
                                                 ref_logps=ref, beta=0.3, backend="torch",
                                                 passes=passes)
    torch.testing.assert_close(evaluated.loss, trained.loss)


def test_forward_split_count_fills_waves_and_keeps_hidden_in_l2():
    # 12,288 tokens in 128-token tiles, 1,002 vocab tiles, 132 SMs x 1 CTA: 3 splits would
    # leave the last wave a quarter empty (288 of 396); 4 fill 97 %.
    assert linear_logps.vocab_splits(96, 1002, 132) == 4
    # An H100's 50 MiB L2 and 256 x 4096 bf16 hidden tiles (2 MiB): 132 resident programs
    # must share at most 12 token tiles, so 11 splits at least; 48 x 11 = 4 full waves.
    minimum = linear_logps.l2_min_splits(132, 256 * 4096 * 2, 50 * 2**20)
    assert minimum == 11 and linear_logps.vocab_splits(48, 1002, 132, minimum) == 11
    # Few tokens: as many splits as fill the machine; never more splits than vocab tiles.
    assert linear_logps.vocab_splits(1, 1002, 132) == 126        # 126 x 8 tiles, 95 %
    assert linear_logps.vocab_splits(1, 4, 132) == 4
