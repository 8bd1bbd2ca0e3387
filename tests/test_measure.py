"""`mixpo plan --measure`: the planned step on fake tensors under torch's memory tracker, on
small Llama shapes (seconds each). The plan agrees with it within 5 % for three
configurations (step-in-backward, accumulated gradients with fused AdamW, FSDP2 over a fake
process group of 2 ranks); on a tiny model the fake run equals a real CPU run under the same
tracker. Real-scale measurements (Llama-3-8B, 70B) are in
benchmarks/results/plan_measured.json (`python -m mixpo.train.measure`)."""
import pytest
from transformers import LlamaConfig

from mixpo.cli import main
from mixpo.train.measure import measure_plan
from mixpo.train.plan import (RUNTIME_RESERVE_BYTES, Workload, mixpo_plan, model_shape,
                              peak_phases, plan_total)


def _config(tmp_path, name, **values):
    shape = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536,
                 num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                 tie_word_embeddings=False)
    LlamaConfig(**{**shape, **values}).save_pretrained(tmp_path / name)
    return str(tmp_path / name / "config.json")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _config(tmp_path_factory.mktemp("plan"), "small")


# (GPUs, optimizer, step-in-backward, micro-batch, the plan's peak phase)
CONFIGURATIONS = [(1, "adamw_bf16", True, 1, "optimizer step"),
                  (1, "adamw", False, 2, "forward and backward"),
                  (2, "adamw_bf16", False, 1, "root unit's gradient reduce")]


@pytest.mark.parametrize("gpus,optim,step_in_backward,pairs,phase", CONFIGURATIONS)
def test_the_plan_is_within_5_percent_of_the_measured_step(small, gpus, optim,
                                                          step_in_backward, pairs, phase):
    work = Workload(gpus=gpus, seq_len=256, micro_batch_size=pairs)
    shape = model_shape(small)
    phases = peak_phases(shape, work, mixpo_plan(shape, work, optim=optim,
                                                 step_in_backward=step_in_backward),
                         step_in_backward)
    planned = plan_total(phases) - RUNTIME_RESERVE_BYTES
    assert max(phases, key=lambda name: sum(phases[name].values())) == phase
    measured = measure_plan(small, work, optim=optim, step_in_backward=step_in_backward,
                            micro_batches=1 if step_in_backward else 2)
    assert measured.peak == pytest.approx(planned, rel=0.05)
    assert measured.peak == sum(measured.categories.values())
    if gpus == 2:
        # FSDP2 over the fake process group: rank 0 holds half of every parameter.
        assert measured.categories["SHARDED_PARAM"] == shape.num_params * 2 // 2
    else:
        assert measured.categories["PARAM"] == shape.num_params * 2


def test_the_fake_step_equals_a_real_cpu_run_under_the_same_tracker(tmp_path):
    tiny = _config(tmp_path, "tiny", vocab_size=1000, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4)
    work = Workload(seq_len=32, micro_batch_size=2)
    for optim, step_in_backward in (("adamw_bf16", True), ("adamw", False)):
        fake, real = [measure_plan(tiny, work, optim=optim, step_in_backward=step_in_backward,
                                   backend="torch", fake=fake) for fake in (True, False)]
        # One difference: with real data transformers sees that the attention mask has no
        # padding and skips building it; on fake tensors it builds the boolean causal mask
        # [2B, 1, T, T] (1 byte an entry: 2 MiB for a Llama-3 pair of 1024 tokens).
        assert fake.peak - real.peak == 4 * 32 * 32
        assert fake.categories["ACT"] - real.categories["ACT"] == 4 * 32 * 32
        assert {k: v for k, v in fake.categories.items() if k != "ACT"} == \
            {k: v for k, v in real.categories.items() if k != "ACT"}


def test_plan_measure_prints_the_measurement_beside_the_plan(small, capsys):
    assert main(["plan", "--model", small, "--seq-len", "128", "--step-in-backward",
                 "--global-batch-size", "1", "--measure"]) == 0
    out = capsys.readouterr().out
    assert "planned peak: optimizer step" in out
    line = next(line for line in out.splitlines() if line.startswith("total (without"))
    assert float(line.split("measured / planned")[1]) == pytest.approx(1.0, abs=0.05)
