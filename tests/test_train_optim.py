"""Low-memory AdamW (bf16 states, stochastic rounding) and the learning-rate schedule."""
import pytest
import torch

from mixpo.train.optim import BF16StateAdamW, cosine_lr, stochastic_round_to_bf16


def test_stochastic_rounding_is_unbiased_between_the_two_neighbours():
    torch.manual_seed(0)
    value = 1.0 + 2.0 ** -10                      # bf16 neighbours: 1 and 1 + 2^-7
    rounded = stochastic_round_to_bf16(torch.full((200_000,), value)).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    assert rounded.mean().item() == pytest.approx(value, abs=2e-5)
    exact = torch.tensor([0.5, -3.0, 1.0 + 2.0 ** -7])  # representable values stay put
    assert torch.equal(stochastic_round_to_bf16(exact).float(), exact)


def test_tiny_updates_survive_on_bf16_weights_only_with_stochastic_rounding():
    torch.manual_seed(0)
    lr = 1e-5                                     # far below bf16's spacing at 1.0 (2^-8)
    ours = torch.nn.Parameter(torch.ones(100_000, dtype=torch.bfloat16))
    plain = torch.nn.Parameter(torch.ones(100_000, dtype=torch.bfloat16))
    low_memory = BF16StateAdamW([ours], lr=lr)
    for param, optimizer in ((ours, low_memory),
                             (plain, torch.optim.AdamW([plain], lr=lr, weight_decay=0.0))):
        param.grad = torch.ones_like(param)
        optimizer.step()
    assert torch.equal(plain.float(), torch.ones(100_000))          # rounded away
    assert ours.float().mean().item() == pytest.approx(1 - lr, abs=2e-6)  # kept on average
    state = low_memory.state[ours]  # the moments it stepped with are bf16 (2 B each)
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert state["exp_avg"].shape == ours.shape and state["step"].item() == 1


def test_fp32_weights_follow_torch_adamw_within_bf16_state_precision():
    torch.manual_seed(0)
    start = torch.randn(256)
    ours, reference = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    settings = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    optimizers = BF16StateAdamW([ours], **settings), torch.optim.AdamW([reference], **settings)
    for _ in range(10):
        grad = torch.randn(256)
        for param, optimizer in zip((ours, reference), optimizers):
            param.grad = grad.clone()
            optimizer.step()
    moved = (reference - start).abs().mean()
    assert ((ours - reference).abs().mean() / moved).item() < 0.02
    state = optimizers[0].state[ours]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    # torch.optim would cast loaded moments to the fp32 parameter dtype; they stay bf16.
    reloaded = BF16StateAdamW([ours], **settings)
    reloaded.load_state_dict(optimizers[0].state_dict())
    assert reloaded.state[ours]["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(reloaded.state[ours]["exp_avg_sq"], state["exp_avg_sq"])


def test_cosine_schedule_matches_hugging_face():
    from transformers import get_cosine_schedule_with_warmup

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1e-6)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=3,
                                               num_training_steps=20)
    for step in range(20):
        assert cosine_lr(step, 20, 3, 1e-6) == pytest.approx(optimizer.param_groups[0]["lr"],
                                                             rel=1e-12, abs=1e-20)
        optimizer.step()
        schedule.step()
    assert cosine_lr(0, 20, 3, 1.0) == 0.0 and cosine_lr(3, 20, 3, 1.0) == 1.0


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "constant_with_warmup"])
def test_every_schedule_matches_hugging_face(name):
    """mixpo.schedule is the one schedule of the trainer and of Selective DPO's reference
    models: each equals transformers' get_scheduler of the same name, step by step."""
    from transformers import get_scheduler

    from mixpo.schedule import learning_rate_at

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2e-6)
    schedule = get_scheduler(name, optimizer, num_warmup_steps=4, num_training_steps=17)
    for step in range(17):
        assert learning_rate_at(name, step, 17, 4, 2e-6) == pytest.approx(
            optimizer.param_groups[0]["lr"], rel=1e-12, abs=1e-20), step
        optimizer.step()
        schedule.step()


def test_bf16_state_adamw_updates_large_tensors_in_slices(monkeypatch):
    """The update of a tensor larger than UPDATE_CHUNK runs slice by slice (bounded fp32
    temporaries) and, with rounding made deterministic, is bit-equal to the update of the
    whole tensor at once."""
    import mixpo.train.optim as optim

    monkeypatch.setattr(optim, "stochastic_round_to_bf16", lambda values: values.bfloat16())

    def run(chunk):
        monkeypatch.setattr(optim, "UPDATE_CHUNK", chunk)
        gen = torch.Generator().manual_seed(0)
        param = torch.nn.Parameter(torch.randn(7, 5, generator=gen).bfloat16())
        opt = BF16StateAdamW([param], lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            param.grad = torch.randn(7, 5, generator=gen).bfloat16()
            opt.step()
        state = opt.state[param]
        return param.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()

    whole, sliced = run(2**24), run(4)         # 35 elements: 9 slices, the last partial
    for got, want in zip(sliced, whole):
        assert torch.equal(got, want)
    start = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert (whole[0].float() - start.float()).abs().max() > 1e-3      # the step moved it


def test_update_slices_hold_whole_blocks_and_cover_the_rows():
    from mixpo.train.optim import update_slices

    assert update_slices((10,), 4, 1) == [(0, 10)]                   # 1-D: never sliced
    assert update_slices((8, 512), 1 << 20, 256) == [(0, 8)]          # fits: one slice
    assert update_slices((8, 512), 1024, 256) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    # Rows of 100 values: a slice needs a multiple of 64 rows to hold whole 256-value blocks.
    slices = update_slices((200, 100), 1000, 256)
    assert slices == [(0, 64), (64, 128), (128, 192), (192, 200)]
    assert all(r0 * 100 % 256 == 0 for r0, _ in slices)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_adamw_8bit_steps_in_slices_equal_to_torchao_whole_tensor_step(monkeypatch, compiled):
    """`sliced_adamw_8bit` (UPDATE_CHUNK elements at a time, torchao's own update per slice)
    is bit-equal to torchao's AdamW8bit updating each tensor at once: weights and the 8-bit
    codes and block scales of both moments, over three steps, eagerly and compiled."""
    torchao_optim = pytest.importorskip("torchao.optim")
    import mixpo.train.optim as optim

    if not compiled:
        monkeypatch.setattr(torch, "compile", lambda function, *args, **kwargs: function)
    monkeypatch.setattr(optim, "UPDATE_CHUNK", 4096)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 256, generator=gen).bfloat16(), torch.randn(300, generator=gen)]

    def run(optimizer_class):
        params = [torch.nn.Parameter(tensor.clone()) for tensor in start]
        optimizer = optimizer_class(params, lr=torch.tensor(1e-2), weight_decay=0.1)
        for step in range(3):
            grads = torch.Generator().manual_seed(step)
            for param in params:
                param.grad = torch.randn(param.shape, generator=grads).to(param.dtype)
            optimizer.step()
        return params, optimizer.state[params[0]]

    (whole, whole_state) = run(torchao_optim.AdamW8bit)
    (sliced, sliced_state) = run(optim.sliced_adamw_8bit())
    assert optim.update_slices(start[0].shape, 4096, 256) == [(0, 16), (16, 32), (32, 48),
                                                              (48, 64)]
    for got, want in zip(sliced, whole):
        assert torch.equal(got, want)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(sliced_state[key].codes, whole_state[key].codes)
        assert torch.equal(sliced_state[key].scale, whole_state[key].scale)
    assert (whole[0].float() - start[0].float()).abs().max() > 1e-3     # the steps moved it
