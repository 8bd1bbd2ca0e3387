"""A frozen LM head (LoRA that leaves lm_head out, or `requires_grad=False`) costs no dWeight
work or memory in the logit-free loss: the backward is told (`weight_grad=False`), allocates no
[V, H] gradient and runs no dWeight product, and d loss / d hidden is unchanged."""
import contextlib
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import mixpo
from mixpo.kernels import linear_logps, linear_logps_torch, linear_one_pass

V, H = 1024, 16


# Ops that return new memory (views such as a slice of the weight do not).
ALLOCATING = {"aten.empty", "aten.zeros", "aten.empty_like", "aten.zeros_like", "aten.new_empty",
              "aten.new_zeros", "aten.mm", "aten.addmm", "aten._to_copy", "aten.clone"}


class Recorder(TorchDispatchMode):
    """The ops run under it, and the shapes of every tensor the allocating ones return. The
    head's kernels run inside custom ops (`mixpo.kernels.ops`), where a dispatch mode
    entered outside sees only the op: `inside()` records within the kernels themselves."""

    def __init__(self):
        super().__init__()
        self.ops, self.shapes = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.ops.add(name)
        if name in ALLOCATING:
            self.shapes.update(tuple(t.shape) for t in tree_flatten(out)[0]
                               if isinstance(t, torch.Tensor))
        return out

    @contextlib.contextmanager
    def inside(self):
        """Record the ops of the logit-free kernels' launch helpers (both backends)."""
        def recorded(function):
            def wrapper(*args, **kwargs):
                with self:
                    return function(*args, **kwargs)
            return wrapper

        with contextlib.ExitStack() as stack:
            for module in (linear_logps, linear_logps_torch):
                for name in ("linear_token_logps_forward", "linear_token_logps_backward"):
                    stack.enter_context(mock.patch.object(
                        module, name, recorded(getattr(module, name))))
            stack.enter_context(mock.patch.object(
                linear_one_pass, "linear_token_logps_one_pass",
                recorded(linear_one_pass.linear_token_logps_one_pass)))
            yield self


def batch(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 12, H, generator=generator).to(dtype)
    weight = (torch.randn(V, H, generator=generator) * 0.3).to(dtype)
    labels = torch.randint(0, V, (4, 12), generator=generator)
    labels[:, :5] = -100                                  # prompt
    labels[1, 9:] = -100                                  # ragged
    ref = torch.randn(4, generator=generator) * 3 - 30
    return hidden, weight, labels, ref


def backward(hidden, weight, labels, ref, backend, frozen, passes=2):
    """Gradients and the ops of the backward (passes=2) or of the whole one pass."""
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_(not frozen)
    recorder = Recorder()
    with recorder.inside() if passes == 1 else contextlib.nullcontext():
        out = mixpo.linear_preference_loss(hidden, weight, labels, ref_logps=ref, beta=0.5,
                                           backend=backend, passes=passes)
    with recorder.inside() if passes == 2 else contextlib.nullcontext():
        out.loss.backward()
    return hidden.grad, weight.grad, recorder


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_head_backward_has_no_dweight(backend, dtype):
    hidden, weight, labels, ref = batch(dtype)
    trained = backward(hidden, weight, labels, ref, backend, frozen=False)
    frozen = backward(hidden, weight, labels, ref, backend, frozen=True)
    assert trained[1] is not None and trained[1].abs().sum() > 0
    assert frozen[1] is None
    torch.testing.assert_close(frozen[0], trained[0], rtol=0, atol=0)   # same dHidden work
    if backend == "torch":    # (the Triton interpreter copies every kernel argument on host)
        # The twin's GEMMs per vocab chunk: logits (addmm), dHidden (addmm_ into fp32) and
        # dWeight (mm, written once); frozen: no dWeight GEMM.
        assert {"aten.addmm", "aten.addmm_", "aten.mm"} <= trained[2].ops
        assert "aten.addmm_" in frozen[2].ops and "aten.mm" not in frozen[2].ops
        if dtype == torch.float32:      # (a bf16 weight chunk is upcast, also [V, H] here)
            assert (V, H) in trained[2].shapes and (V, H) not in frozen[2].shapes


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_frozen_head_one_pass_has_no_dweight(backend):
    """The one pass computes its gradients in the forward: a frozen head skips the dWeight
    GEMM there, with the same dHidden."""
    hidden, weight, labels, ref = batch(torch.float32)
    trained = backward(hidden, weight, labels, ref, backend, frozen=False, passes=1)
    frozen = backward(hidden, weight, labels, ref, backend, frozen=True, passes=1)
    assert trained[1] is not None and frozen[1] is None
    torch.testing.assert_close(frozen[0], trained[0], rtol=0, atol=0)
    assert (V, H) in trained[2].shapes and (V, H) not in frozen[2].shapes


@pytest.mark.parametrize("module,extra", [
    (linear_logps_torch, {"workspace_bytes": 1}),               # several vocab chunks
    (linear_logps, {}),
    (linear_logps, {"method": "atomic", "vocab_chunk": 256})])  # 16-bit dWeight chunks
def test_kernel_backward_without_weight_grad(module, extra):
    """The kernels' own contract: dweight None, dhidden and dbias as with weight_grad=True."""
    hidden, weight, labels, _ = batch(torch.bfloat16, seed=1)
    bias = torch.randn(V).to(torch.bfloat16)
    hidden2d = hidden.reshape(-1, H)
    rows = torch.nonzero(labels.reshape(-1) != -100).squeeze(1)
    row_labels = labels.reshape(-1)[rows]
    token_logps, lse, aux = module.linear_token_logps_forward(hidden2d, weight, bias,
                                                              row_labels, rows)
    grad_token = torch.randn(rows.shape[0], generator=torch.Generator().manual_seed(2))
    both = module.linear_token_logps_backward(hidden2d, weight, bias, row_labels, rows, lse,
                                              grad_token, aux["label_logit"], **extra)
    only = module.linear_token_logps_backward(hidden2d, weight, bias, row_labels, rows, lse,
                                              grad_token, aux["label_logit"],
                                              weight_grad=False, **extra)
    assert both[1] is not None and only[1] is None
    torch.testing.assert_close(only[0], both[0], rtol=0, atol=0)
    torch.testing.assert_close(only[2], both[2], rtol=0, atol=0)
