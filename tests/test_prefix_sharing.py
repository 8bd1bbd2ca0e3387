"""Prefix sharing: chosen and rejected read their prompt once ([prompt | chosen | rejected] in
one packed row, the rejected tokens masked from the chosen ones). Every loss type, with routing
and margins, gives the values and gradients of unshared packed rows."""

import pytest
import torch

from mixpo.data.collate import PackedPreferenceCollator, SharedPrefixCollator
from mixpo.hf.policy import PreferenceModel, shared_prefix_attention
from mixpo.loss_config import LossConfig
from mixpo.loss_spec import LOSS_TYPES
from test_hf_policy import LENGTHS, tiny_model, tokenized_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(collator, examples, loss, attention, ref, hard=None, gamma=None):
    model = tiny_model("llama").train()
    model.set_attn_implementation(attention)
    with torch.no_grad():
        model.get_output_embeddings().weight.div_(20.0)
    policy = PreferenceModel(model, LossConfig(**loss))
    batch = collator(examples)
    if hard is not None:
        batch["hard"] = hard
    value, out = policy(batch, ref_logps=ref, gamma=gamma, validate=False)
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        logps = policy(batch, logps_only=True)
    return value.detach(), out.per_pair_loss.detach(), logps, grads


def _assert_same(shared, unshared):
    for got, want in zip(shared[:3], unshared[:3]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert set(shared[3]) == set(unshared[3])
    for name, grad in unshared[3].items():   # fp32 rounding: 1e-5 of the gradient's scale
        torch.testing.assert_close(shared[3][name], grad, rtol=1e-5,
                                   atol=1e-5 * grad.abs().max().item(), msg=name)


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_every_loss_type_equals_unshared_rows(loss_type):
    examples = tokenized_pairs(LENGTHS["ragged"])
    loss = dict(loss_type=loss_type, beta=0.5,
                label_smoothing=0.1 if LOSS_TYPES[loss_type].label_smoothing == "required"
                else 0.0)
    ref = None if LOSS_TYPES[loss_type].reference_free \
        else -torch.linspace(5, 25, 2 * len(examples))
    results = [_run(collator, examples, loss, "sdpa", ref)
               for collator in (SharedPrefixCollator(), PackedPreferenceCollator())]
    _assert_same(*results)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])    # boolean / additive masks
@pytest.mark.parametrize("layout", sorted(LENGTHS))
def test_routing_and_margins_equal_unshared_rows(layout, attention):
    examples = tokenized_pairs(LENGTHS[layout])
    pairs = len(examples)
    hard = torch.arange(pairs) % 2 == 0
    gamma = torch.linspace(0.1, 0.9, pairs)
    loss = dict(loss_type="sigmoid", beta=0.5, sft_weight=0.2, ld_alpha=0.5)
    ref = -torch.linspace(5, 25, 2 * pairs)
    results = [_run(collator, examples, loss, attention, ref, hard=hard, gamma=gamma)
               for collator in (SharedPrefixCollator(), PackedPreferenceCollator())]
    _assert_same(*results)


def test_an_empty_prompt_and_a_one_token_completion():
    examples = tokenized_pairs([(0, 4, 3), (5, 1, 2), (3, 2, 1)])
    results = [_run(collator, examples, dict(loss_type="simpo", beta=2.0), "sdpa", None)
               for collator in (SharedPrefixCollator(), PackedPreferenceCollator())]
    _assert_same(*results)


def test_layout_positions_and_mask():
    batch = SharedPrefixCollator()(tokenized_pairs([(2, 3, 1), (1, 1, 2)]))
    # pair 0: prompt 2, chosen 3, rejected 1; pair 1: prompt 1, chosen 1, rejected 2
    assert batch["input_ids"].shape == (1, 6 + 4)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 2, 0, 1, 1, 2]
    assert batch["segment_lengths"].tolist() == [2, 3, 1, 1, 1, 2]
    assert batch["completion_counts"].tolist() == [3.0, 1.0, 1.0, 2.0]
    # chosen 0 is predicted from rows 1 (last prompt token), 2, 3; chosen 1 from row 6;
    # rejected 0 from row 1 again; rejected 1 from rows 6 and 8.
    assert batch["completion_positions"].tolist() == [1, 2, 3, 6, 1, 6, 8]
    ids = batch["input_ids"][0]
    assert batch["labels"][0].tolist() == ids[[2, 3, 4, 7, 5, 8, 9]].tolist()
    mask = shared_prefix_attention(batch, "sdpa", torch.float32)["attention_mask"][0, 0]
    expected = torch.zeros(10, 10, dtype=torch.bool)
    for query, keys in {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 2, 3, 4],
                        5: [0, 1, 5], 6: [6], 7: [6, 7], 8: [6, 8], 9: [6, 8, 9]}.items():
        expected[query, keys] = True
    assert torch.equal(mask, expected)
    eager = shared_prefix_attention(batch, "eager", torch.float32)["attention_mask"][0, 0]
    assert torch.equal(eager == 0, expected)
    with pytest.raises(ValueError, match="cannot run under flash-attn"):
        shared_prefix_attention(batch, "flash_attention_2", torch.float32)


def test_flex_attention_block_mask_gives_the_unshared_log_probs():
    """flex_attention gets a BlockMask of the same rule as the dense mask. Its forward runs on
    the CPU (compiled; its backward is CUDA-only), so the reference pass is checked here: the
    shared row under flex_attention scores what unshared rows score under sdpa."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    examples = tokenized_pairs(LENGTHS["ragged"])
    batch = SharedPrefixCollator()(examples)
    dense = shared_prefix_attention(batch, "sdpa", torch.float32)["attention_mask"][0, 0]
    block = shared_prefix_attention(batch, "flex_attention", torch.float32)["attention_mask"]
    total = dense.shape[0]
    index = torch.arange(total)
    assert torch.equal(block.mask_mod(0, 0, index[:, None], index[None, :]), dense)
    logps = {}
    for attention, collator in (("flex_attention", SharedPrefixCollator()),
                                ("sdpa", PackedPreferenceCollator())):
        model = tiny_model("llama")
        model.set_attn_implementation(attention)
        with torch.no_grad():
            logps[attention] = PreferenceModel(model)(collator(examples), logps_only=True)
    torch.testing.assert_close(logps["flex_attention"], logps["sdpa"], rtol=1e-5, atol=1e-5)


# ---- the trainer ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fixtures import tiny_training_setup

    return tiny_training_setup(tmp_path_factory.mktemp("sharing"), pairs=8)


@pytest.mark.parametrize("reference", ["precomputed", "live"])
def test_trainer_with_prefix_sharing_follows_the_unshared_run(tiny, tmp_path, reference):
    from fixtures import tiny_train_config
    from mixpo.train.metrics import read_metrics
    from mixpo.train.trainer import train

    runs = {}
    for sharing in (True, False):
        out = tmp_path / f"sharing-{sharing}"
        train(tiny_train_config(tiny, out, max_length=64, max_prompt_length=512, max_steps=2,
                                padding_free=True, prefix_sharing=sharing, reference=reference,
                                difficulty="rating", route_below=1.0,
                                attn_implementation="sdpa"))
        runs[sharing] = read_metrics(out)
    for shared, unshared in zip(runs[True], runs[False]):
        for name in ("loss", "rewards/margins", "logps/chosen", "logps/rejected",
                     "grad_norm"):
            assert shared[name] == pytest.approx(unshared[name], rel=1e-4, abs=1e-6), name


def test_prefix_sharing_needs_padding_free(tiny, tmp_path):
    from mixpo.train.config import TrainConfig, build_config

    root, data = tiny
    with pytest.raises(ValueError, match="prefix_sharing needs padding_free"):
        build_config(TrainConfig, None, dict(model_name_or_path=str(root / "model"),
                                             train_file=str(data), prefix_sharing=True))
