"""mixpo's ops as torch custom ops: the loss on fake tensors at Llama-3 shape (both backends,
both front ends), a fullgraph torch.compile of a tiny training step equal to eager, the ops
checked by torch.library.opcheck (fake implementations, autograd registration, AOT
dispatch), and the per-pair head written once (autograd) against the float64 oracle."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mixpo
from formulas import pair_losses
from mixpo.kernels import ops
from mixpo.loss_config import LossConfig
from mixpo.losses import linear_loss

V3, H3 = 128256, 4096            # Llama-3-8B's head


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_loss_runs_on_fake_tensors_at_llama3_shape(backend):
    """Nothing is computed: shapes and dtypes only, in well under a second, with every option
    that reads values on the host in eager mode (labels, routing, LD-DPO, WPO, metrics)."""
    with FakeTensorMode():
        hidden = torch.empty(4, 1024, H3, dtype=torch.bfloat16).requires_grad_()
        weight = torch.empty(V3, H3, dtype=torch.bfloat16).requires_grad_()
        labels = torch.randint(0, V3, (4, 1024))
        ref, hard = torch.empty(4), torch.zeros(2, dtype=torch.bool)
        # The public front end: the completion rows found by the static compaction.
        out = mixpo.linear_preference_loss(hidden, weight, labels, ref_logps=ref, hard=hard,
                                           ld_alpha=0.5, use_weighting=True, sft_weight=0.1,
                                           token_metrics=True, backend=backend)
        out.loss.backward()
        assert out.loss.shape == () and out.per_pair_loss.shape == (2,)
        assert out.chosen_token_sums.shape == (2, 4)
        assert hidden.grad.shape == hidden.shape and weight.grad.dtype == torch.bfloat16
        # The trainer's front end: a packed row and the collator's completion rows; a batch
        # whose fp32 logits fit the workspace takes the one pass (a custom op too).
        for tokens in (2048, 64):
            rows = torch.arange(tokens)
            packed = torch.empty(1, tokens, H3, dtype=torch.bfloat16).requires_grad_()
            out = linear_loss(packed, weight, torch.randint(0, V3, (1, tokens)),
                              LossConfig(loss_type="simpo"), backend=backend,
                              completion_rows=rows, completion_sequences=rows * 4 // tokens,
                              completion_counts=torch.full((4,), tokens / 4),
                              validate=False)
            out.loss.backward()
            assert packed.grad.shape == packed.shape
        logits = torch.empty(4, 1024, V3, dtype=torch.bfloat16).requires_grad_()
        out = mixpo.preference_loss(logits, labels, ref_logps=ref, backend=backend)
        out.loss.backward()
        assert logits.grad.shape == logits.shape and logits.grad.dtype == torch.bfloat16


class TinyPolicy(torch.nn.Module):
    """Embedding -> tanh(linear) -> the logit-free loss on the head's weight."""

    def __init__(self, vocab_size=300, hidden_size=16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, hidden_size)
        self.body = torch.nn.Linear(hidden_size, hidden_size)
        self.head = torch.nn.Linear(hidden_size, vocab_size, bias=False)

    def forward(self, ids, labels, ref, hard, shape):
        hidden = torch.tanh(self.body(self.embed(ids)))
        if shape is None:            # the public API (static compaction under compile)
            return mixpo.linear_preference_loss(
                hidden, self.head.weight, labels, ref_logps=ref, hard=hard, ld_alpha=0.5,
                sft_weight=0.1, token_metrics=True, backend="torch").loss
        return linear_loss(hidden, self.head.weight, labels,
                           LossConfig(use_weighting=True, label_smoothing=0.1), ref_logps=ref,
                           hard=hard, backend="torch", validate=False, **shape).loss


def test_fullgraph_compile_of_a_training_step_equals_eager():
    torch.manual_seed(0)
    model = TinyPolicy()
    ids = torch.randint(0, 300, (4, 10))
    labels = torch.randint(0, 300, (4, 10))
    labels[:, :3] = -100
    labels[1, 8:] = -100
    ref, hard = torch.randn(4) - 20, torch.tensor([False, True])
    rows = torch.nonzero(labels.reshape(-1) != -100).squeeze(1)
    collated = {"completion_rows": rows, "completion_sequences": rows // 10,
                "completion_counts": (labels != -100).sum(1).float()}
    compiled = torch.compile(model, fullgraph=True)
    for shape in (None, collated):
        results = []
        for step in (model, compiled):
            model.zero_grad()
            loss = step(ids, labels, ref, hard, shape)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        (eager, eager_grads), (loss, grads) = results
        torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)
        for got, want in zip(grads, eager_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("inplace", [False, True])
def test_fullgraph_compile_of_the_logits_loss_equals_eager(inplace):
    torch.manual_seed(1)
    layer = torch.nn.Linear(8, 50)
    x = torch.randn(4, 6, 8)
    labels = torch.randint(0, 50, (4, 6))
    labels[:, :2] = -100

    def step(x):
        return mixpo.preference_loss(layer(x), labels, ref_logps=torch.full((4,), -9.0),
                                     inplace_backward=inplace, backend="torch").loss

    results = []
    for run in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        layer.zero_grad()
        loss = run(x)
        loss.backward()
        results.append((loss.detach(), layer.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])


def _linear_inputs(dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(12, 16, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(200, 16, generator=gen) / 4).to(dtype).requires_grad_()
    rows = torch.tensor([1, 2, 3, 5, 8, 9, 10])
    labels = torch.randint(0, 200, (7,), generator=gen)
    return hidden, weight, (torch.randn(200, generator=gen).to(dtype).requires_grad_()
                            if bias else None), labels, rows


@pytest.mark.parametrize("triton", [False, True])
def test_opcheck_of_every_op(triton):
    """torch.library.opcheck: schema, fake implementation vs the real one, autograd
    registration, AOT dispatch (values and gradients), for both backends."""
    hidden, weight, bias, labels, rows = _linear_inputs(torch.float32)
    for args in [(hidden, weight, bias, labels, rows, 1.0, None, True, None, triton),
                 (hidden, weight, None, labels, rows, 0.5, 30.0, False, 4096, triton)]:
        torch.library.opcheck(ops.linear_token_logps, args)
    logits = torch.randn(4, 5, 60, requires_grad=True)
    logit_labels = torch.randint(0, 60, (4, 5))
    logit_labels[:, 0] = -100
    torch.library.opcheck(ops.logits_token_logps,
                          (logits, logit_labels, -100, 1.0, None, True, False, triton))
    torch.library.opcheck(ops.solve_margins, (torch.randn(9), 0.5, 1.0, 20, triton))


def test_fake_implementations_match_every_output():
    """Each op's fake implementation gives the real outputs' shapes, dtypes and workspace
    size, on both backends and for a 16-bit head (the GPU path's 16-bit workspace)."""
    for dtype in (torch.float32, torch.bfloat16):
        for triton in (False, True):
            hidden, weight, bias, labels, rows = _linear_inputs(dtype)
            args = (hidden, weight, bias, labels, rows, 1.0, None, True, 2**16, triton)
            real = ops.linear_token_logps(*args)
            coef = torch.randn(7)
            back = (hidden, weight, bias, labels, rows, real[1], coef, real[2], 1.0, None,
                    2**16, True, triton)
            real_back = ops.linear_token_logps_backward(*back)
            with FakeTensorMode() as mode:
                fake = ops.linear_token_logps(*[mode.from_tensor(a) if isinstance(
                    a, torch.Tensor) else a for a in args])
                fake_back = ops.linear_token_logps_backward(*[mode.from_tensor(a) if isinstance(
                    a, torch.Tensor) else a for a in back])
            for got, want in zip(fake + fake_back, real + real_back):
                assert (got.shape, got.dtype) == (want.shape, want.dtype)
            workspace = real_back[3].numel()
            grad_bytes = (dtype.itemsize if triton else 4)
            assert workspace >= 7 * 200 * grad_bytes      # the [n, C] gradient chunk, C = V


HEAD_CASES = [
    dict(loss_type="sigmoid", label_smoothing=0.1), dict(loss_type="robust", label_smoothing=0.2),
    dict(loss_type="hinge"), dict(loss_type="ipo"), dict(loss_type="exo_pair",
                                                         label_smoothing=0.1),
    dict(loss_type="discopop"), dict(loss_type="sigmoid_norm"), dict(loss_type="simpo"),
    dict(loss_type="cpo"), dict(loss_type="nca_pair"), dict(loss_type="bco_pair"),
    dict(loss_type="sppo_hard"), dict(loss_type="apo_zero"), dict(loss_type="apo_down"),
    dict(loss_type="orpo"), dict(loss_type="sft"), dict(loss_type="aot"),
    dict(loss_type="aot_unpaired", label_smoothing=0.1),
    dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", rdpo_alpha=0.01,
         dpop_lambda=0.5, sft_weight=0.3, nll_normalization="pair"),
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
]


@pytest.mark.parametrize("keywords", HEAD_CASES, ids=lambda k: str(k["loss_type"]))
def test_the_one_per_pair_definition_against_the_float64_oracle(keywords):
    """`mixpo.kernels.pair_loss` (fp32, autograd) against tests/formulas.py (float64,
    written independently): per-pair losses and d loss / d logps, with routing and margins
    where the type has them."""
    from mixpo.functions import pair_head

    gen = torch.Generator().manual_seed(3)
    counts = torch.randint(3, 40, (8,), generator=gen).double()
    logps = -counts * (0.3 + 2 * torch.rand(8, generator=gen, dtype=torch.float64))
    config = LossConfig(**keywords)
    ref = None if config.reference_free else logps + torch.randn(8, generator=gen,
                                                                 dtype=torch.float64)
    sorted_type = bool(config.sorted_types)
    hard = None if sorted_type else torch.tensor([False, True, False, False])
    gamma = torch.tensor([0.1, 0.0, 0.3, 0.2]) if config.has_margin else torch.zeros(4)
    leaf = logps.float().requires_grad_()
    loss, per_pair = pair_head(leaf, leaf, counts.float(), None if ref is None else ref.float(),
                               hard, gamma, None, config)
    loss.backward()
    oracle = logps.clone().requires_grad_()
    extra = {} if not config.has_margin else {"gamma": gamma.double()}
    want_pairs, want = pair_losses(oracle, counts, ref_logps=ref, hard=hard, **keywords,
                                   **extra)
    want.backward()
    torch.testing.assert_close(per_pair.double(), want_pairs, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(leaf.grad.double(), oracle.grad, rtol=2e-4, atol=2e-6)
