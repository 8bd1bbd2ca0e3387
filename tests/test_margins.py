"""gamma-PO AdaptiveMargin: the authors' properties, Triton solve vs torch twin, state."""
import pytest
import torch

import mixpo
from mixpo.kernels.margin_solve_torch import solve_margins as twin_solve
from mixpo.kernels.margin_solve import solve_margins as triton_solve


def test_solver_properties():
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0))
    gaps = torch.linspace(-3, 3, 200)[order]
    gamma = twin_solve(gaps, gamma0=1.5, tau=2.0)
    assert (gamma >= 0).all()
    assert gamma.mean().item() == pytest.approx(1.5, rel=1e-5)   # mean over the solve set
    order = torch.argsort(gaps)
    assert (gamma[order].diff() >= -1e-6).all()                  # larger gap -> larger margin
    assert gamma.max() > gamma.min() + 0.1


def test_large_tau_gives_uniform_margins():
    gamma = twin_solve(torch.randn(64), gamma0=0.8, tau=1e6)
    torch.testing.assert_close(gamma, torch.full((64,), 0.8), rtol=1e-4, atol=1e-4)


def test_iterations_follow_the_authors_loop():
    # 20 loop turns apply 19 updates: one turn leaves p uniform, gamma = gamma0 everywhere.
    gaps = torch.randn(10)
    torch.testing.assert_close(twin_solve(gaps, 1.0, 1.0, iters=1),
                               torch.ones(10))
    probs = torch.full((10,), 0.1)
    grad = 1.0 * (1 + torch.log(10 * (probs + 1e-10))) + torch.sigmoid(10 * probs - gaps)
    probs = probs * torch.exp(-0.5 * grad)
    torch.testing.assert_close(twin_solve(gaps, 1.0, 1.0, iters=2),
                               10 * probs / probs.sum())


@pytest.mark.parametrize("num", [7, 256, 300])
def test_triton_solve_matches_torch(num):
    gaps = 2 * torch.randn(num, generator=torch.Generator().manual_seed(num))
    torch.testing.assert_close(triton_solve(gaps, 0.6, 3.0), twin_solve(gaps, 0.6, 3.0),
                               rtol=1e-4, atol=1e-5)


def test_queue_sampling_and_push():
    solver = mixpo.AdaptiveMargin(1.0, 10.0, queue_size=20, solve_size=12, seed=0)
    assert len(solver.queue) == 8                     # the authors' 8 N(0, 1) start values
    expected_start = torch.randn(8, generator=torch.Generator().manual_seed(0)).tolist()
    assert list(solver.queue) == pytest.approx(expected_start)
    gamma = solver(torch.tensor([0.1, 2.0, -1.0, 0.5]))
    assert gamma.shape == (4,) and not gamma.requires_grad
    assert len(solver.queue) == 12                    # current gaps pushed after solving
    assert list(solver.queue)[-4:] == pytest.approx([0.1, 2.0, -1.0, 0.5])
    for _ in range(5):
        solver(torch.randn(4))
    assert len(solver.queue) == 20                    # FIFO bounded by queue_size


def test_empty_init_queue_and_center():
    solver = mixpo.AdaptiveMargin(1.0, 5.0, init_queue=[], center=True)
    gamma = solver(torch.tensor([-1.0, 0.0, 1.0]))
    # Solve set = the batch alone; centred margins have mean 0 over it.
    assert gamma.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert gamma[2] > gamma[0]


def test_state_dict_round_trip_is_exact():
    solver = mixpo.AdaptiveMargin(0.5, 2.0, queue_size=64, solve_size=16, seed=7)
    for _ in range(3):
        solver(torch.randn(4))
    state = solver.state_dict()
    clone = mixpo.AdaptiveMargin(0.5, 2.0, queue_size=64, solve_size=16, seed=123)
    clone.load_state_dict(state)
    batches = [torch.randn(4) for _ in range(4)]
    for gaps in batches:
        torch.testing.assert_close(solver(gaps), clone(gaps), rtol=0, atol=0)
    with pytest.raises(ValueError, match="tau"):
        mixpo.AdaptiveMargin(0.5, 3.0, queue_size=64, solve_size=16).load_state_dict(state)


def test_margin_receives_the_right_gaps():
    """preference_loss hands beta*h (DPO) / beta*(avg_w - avg_l) (SimPO) to the solver."""
    class Recorder(mixpo.AdaptiveMargin):
        def __call__(self, reward_gaps):
            self.seen = reward_gaps.clone()
            return super().__call__(reward_gaps)

    logits = torch.randn(4, 5, 30)
    labels = torch.randint(0, 30, (4, 5))
    labels[:, 0] = -100
    ref = torch.randn(4)
    for loss_type in ("sigmoid", "simpo"):
        solver = Recorder(1.0, 1.0)
        out = mixpo.preference_loss(logits, labels, loss_type=loss_type, beta=2.0,
                                    ref_logps=None if loss_type == "simpo" else ref,
                                    margin=solver, backend="torch")
        logps = torch.cat([out.chosen_logps, out.rejected_logps])
        if loss_type == "sigmoid":
            ratio = logps - ref
        else:
            ratio = logps / (labels != -100).sum(1)
        torch.testing.assert_close(solver.seen, 2.0 * (ratio[:2] - ratio[2:]))
