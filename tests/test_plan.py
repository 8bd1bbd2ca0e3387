"""`mixpo plan` arithmetic against numbers worked out by hand for Llama-3-8B."""
import argparse

import pytest

from mixpo.cli import main
from mixpo.train.plan import (GIB, Workload, mixpo_plan, model_shape, peak_phases,
                              plan_command, plan_total, trl_default_plan)

# Llama-3-8B by hand: V 128256, H 4096, 32 layers, MLP 14336, 8 KV heads of 128 (1024).
V, H, L, I, KV = 128256, 4096, 32, 14336, 1024
EMBED = V * H                                               # 525,336,576 (head: the same)
LAYER = (2 * H * H + 2 * H * KV) + 3 * H * I + 2 * H        # attention + MLP + 2 norms
PARAMS = 2 * EMBED + L * LAYER + H                          # + final norm
TOKENS = 2 * 1 * 1024                                       # 1 pair = 2 sequences of 1024
LAYER_VALUES = 4 * H + 3 * H + 3 * KV + 4 * I               # saved per token per layer
CHUNK = 2**24                     # BF16StateAdamW updates a tensor in slices of this many


@pytest.fixture(scope="module")
def llama3_8b():
    return model_shape("llama-3-8b")


def test_parameter_counts_match_the_released_models(llama3_8b):
    assert PARAMS == 8_030_261_248 == llama3_8b.num_params
    assert llama3_8b.largest_param == EMBED and llama3_8b.layer_params == LAYER
    assert LAYER_VALUES == 89_088 == llama3_8b.layer_activation_values
    assert model_shape("qwen-2.5-7b").num_params == 7_615_616_512
    gemma = model_shape("gemma-2-9b")
    assert gemma.num_params == 9_241_705_984 and "final_logit_softcapping" in gemma.logit_transform


def test_mixpo_components_on_one_gpu(llama3_8b):
    work = Workload(gpus=1, seq_len=1024, micro_batch_size=1)
    plan = mixpo_plan(llama3_8b, work, optim="adamw_bf16", reference="precomputed")
    activations = L * TOKENS * H * 2 + 2 * TOKENS * LAYER_VALUES * 2
    assert plan == {
        "weights": 2 * PARAMS,                       # bf16
        "gradients": 2 * PARAMS,                     # accumulation keeps every gradient
        "optimizer states": 4 * PARAMS,              # two bf16 moments
        # BF16StateAdamW's update of a slice of the biggest tensor: fp32 gradient, moments,
        # denominator and weights (20 B) plus stochastic rounding's three int32 temporaries
        # (12 B), CHUNK elements at a time
        "optimizer step": 32 * CHUNK,
        "activations": activations,                  # 1,266,679,808
        # two passes (2048 tokens' fp32 logits exceed the 256 MiB workspace): the softmax-
        # gradient workspace, the fp32 dHidden accumulator and bf16 copy of the completion
        # rows, hidden and dHidden
        "loss head": 256 * 2**20 + TOKENS * H * 6 + 2 * TOKENS * H * 2,
        "FSDP buffers": 0,
        "reference model": 0,
        "runtime reserve": 3 * GIB,
    }
    assert activations == 1_266_679_808
    phases = peak_phases(llama3_8b, work, plan)
    inputs = L * TOKENS * H * 2
    assert {name: sum(parts.values()) for name, parts in phases.items()} == {
        # the head (0.33 GiB) runs before the recomputed layers (0.68 GiB) take its place
        "forward and backward": 8 * PARAMS + inputs + 2 * TOKENS * LAYER_VALUES * 2 + 3 * GIB,
        "optimizer step": 8 * PARAMS + 32 * CHUNK + 3 * GIB}
    assert plan_total(phases) / GIB == pytest.approx(64.01, abs=0.005)   # measured: 64.69
    # A smaller workspace budget shrinks the head; a micro-batch smaller than it uses less,
    # and one whose fp32 logits fit takes the one pass (logits, their bf16 gradient, the
    # head's gradient from the forward on).
    small = mixpo_plan(llama3_8b, work, workspace_bytes=64 * 2**20)
    assert plan["loss head"] - small["loss head"] == 192 * 2**20
    tiny = mixpo_plan(llama3_8b, Workload(seq_len=64), workspace_bytes=40 * 2**20)
    assert tiny["loss head"] == 128 * V * 2 + 128 * H * 6 + 2 * 128 * H * 2
    one = mixpo_plan(llama3_8b, Workload(seq_len=64))       # 128 x V fp32 logits: 63 MiB
    assert one["loss head"] == 128 * V * 6 + 128 * H * 10 + V * H * 2 + 2 * 128 * H * 2
    stepped = mixpo_plan(llama3_8b, work, step_in_backward=True)
    assert stepped["gradients"] == 2 * EMBED          # only the largest gradient is alive
    # The LM head's update, the backward's first, runs beside the layers' saved inputs.
    assert peak_phases(llama3_8b, work, stepped, True)["optimizer step"] == {
        "weights": 2 * PARAMS, "gradients": 2 * EMBED, "optimizer states": 4 * PARAMS
        + 32 * CHUNK, "activations, temporaries": inputs, "runtime reserve": 3 * GIB}
    assert plan_total(peak_phases(llama3_8b, work, stepped, True)) / GIB == \
        pytest.approx(50.03, abs=0.005)
    eight_bit = mixpo_plan(llama3_8b, work, optim="adamw_8bit")
    assert eight_bit["optimizer states"] == 2 * PARAMS + 2 * PARAMS * 4 // 256
    assert eight_bit["optimizer step"] == 0
    assert mixpo_plan(llama3_8b, work, reference="live")["reference model"] == 2 * PARAMS


def test_trl_default_and_sharding(llama3_8b):
    trl = trl_default_plan(llama3_8b, Workload())
    assert trl["weights"] + trl["gradients"] + trl["optimizer states"] == 16 * PARAMS
    assert trl["reference model"] == 2 * PARAMS
    # trl 1.16's fused head: an fp32 [V, H] gradient, one fp32 [4096, 32768] logits tile, the
    # hidden states and their gradient (no [tokens x vocab] logits any more).
    assert trl["loss head"] == V * H * 4 + 4096 * 32768 * 4 + 2 * TOKENS * H * 2
    assert sum(trl.values()) == 151_133_954_048 - TOKENS * V * 8 + trl["loss head"]
    # fp32 master weights (the papers' setup): 16 B per parameter, as TRL's default; torch's
    # fused AdamW keeps no temporaries.
    master = mixpo_plan(llama3_8b, Workload(), optim="adamw", master_weights=True)
    assert master["weights"] + master["gradients"] + master["optimizer states"] == 16 * PARAMS
    assert master["optimizer step"] == 0
    # Four GPUs: states shard by 4; FSDP holds the root unit and two layers unsharded in the
    # backward beside a layer's gradient reduce (bf16 gradients, fp32 copy), and reduces the
    # root unit's gradients through an fp32 copy last: after the copy-in one embedding-sized
    # bf16 gradient is still held beside the fp32 input, the fp32 output shard and its bf16
    # cast (FSDP2's foreach_reduce as the tracker sees it).
    work = Workload(gpus=4)
    four = mixpo_plan(llama3_8b, work)
    root = 2 * EMBED + H
    root_reduce = EMBED * 2 + root * 4 + root * 4 // 4 + root * 2 // 4
    assert root_reduce > root * 6                     # the later moment is the larger
    assert four["optimizer states"] == PARAMS and four["weights"] == 2 * PARAMS // 4
    assert four["optimizer step"] == 32 * CHUNK       # a quarter of the head, in slices
    assert four["FSDP buffers"] == max((root + 2 * LAYER) * 2 + LAYER * 6, root_reduce)
    phases = peak_phases(llama3_8b, work, four)
    assert sum(phases["root unit's gradient reduce"].values()) == \
        2 * PARAMS // 4 * 2 + PARAMS + root_reduce + 3 * GIB
    # fp32 master weights on 2 GPUs (the papers' setup, measured 66.68 GiB): the output
    # shard is not cast, the parameters being fp32.
    two = Workload(gpus=2)
    master_phases = peak_phases(llama3_8b, two, mixpo_plan(llama3_8b, two, optim="adamw",
                                                           master_weights=True),
                                master_weights=True)
    assert master_phases["root unit's gradient reduce"]["activations, temporaries"] == \
        root * 4 + root * 4 // 2


def _args(**overrides):
    values = dict(model="llama-3-8b", gpus=1, gpu_memory=80.0, seq_len=1024,
                  micro_batch_size=1, global_batch_size=128, optim="adamw_bf16",
                  step_in_backward=False, reference="precomputed", gradient_checkpointing=True)
    return argparse.Namespace(**{**values, **overrides})


def test_report_says_llama3_8b_fits_one_80gb_gpu_and_trl_does_not():
    report = plan_command(_args(step_in_backward=True, global_batch_size=1))
    assert "8.03 B parameters" in report
    assert "total" in report and "50.03 GiB" in report and "141.29 GiB" in report
    assert "forward and backward             50.03 GiB  <- peak" in report
    assert "fits? mixpo: yes, 30.0 GiB free; TRL default: no, 61.3 GiB over" in report
    assert "head workspace 256 MiB of a 256 MiB budget" in report
    assert "fused head (trl 1.16)" in report
    default = plan_command(_args())
    assert "64.01 GiB" in default and "mixpo: yes, 16.0 GiB free" in default
    assert "head workspace 64 MiB" in plan_command(_args(head_workspace_mib=64))
    with pytest.raises(ValueError, match="head-workspace-mib"):
        plan_command(_args(head_workspace_mib=0))
    with pytest.raises(ValueError, match="step-in-backward needs one backward per step"):
        plan_command(_args(step_in_backward=True))


def test_plan_reads_a_local_config_and_reports_user_errors(tmp_path, capsys):
    from fixtures import build_tiny_causal_lm, build_tiny_tokenizer

    model = build_tiny_causal_lm(build_tiny_tokenizer())
    model.config.save_pretrained(tmp_path)
    shape = model_shape(str(tmp_path / "config.json"))
    assert shape.num_params == sum(p.numel() for p in model.parameters())
    assert main(["plan", "--model", "no-such-model"]) == 2
    assert "not a config.json, a model directory, or one of" in capsys.readouterr().err
