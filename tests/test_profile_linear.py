"""benchmarks/profile_linear.py: the GEMM FLOPs it reads from the profiler's shapes tell two
passes (4 x 2nVH: the backward recomputes the logits) from one pass (3 x 2nVH), and its JSON
holds one row per case."""
import json

import pytest

import profile_linear


def test_profile_counts_four_gemms_for_two_passes_and_three_for_one(tmp_path):
    output = tmp_path / "profile.json"
    # Forced: at this size the default's workspace holds the batch, so it takes one pass.
    assert profile_linear.main(["--impl", "mixpo", "--passes", "2", "--rows", "2",
                                "--seq-len", "24", "--prompt", "8", "--hidden-size", "16",
                                "--vocab", "1000",
                                "--repeats", "1", "--json", str(output)]) == 0
    (two,) = json.loads(output.read_text())["rows"]
    assert two["gemm_flops_over_2nvh"] == pytest.approx(4.0)
    assert two["options"]["passes"] == 2
    assert 0 < two["gemm_seconds"] <= two["wall_seconds"]
    assert two["op_seconds"]["aten::mm"] > 0

    args = type("Args", (), dict(rows=2, seq_len=24, prompt=8, hidden_size=16, vocab=1000,
                                 repeats=1))
    one = profile_linear.profile_case("mixpo", 1, args)
    assert one["options"]["passes"] == 1
    assert one["gemm_flops_over_2nvh"] == pytest.approx(3.0)


def test_gemm_flops_come_from_the_input_shapes():
    assert profile_linear._gemm_flops("aten::mm", [[4, 8], [8, 3]]) == 2 * 4 * 8 * 3
    assert profile_linear._gemm_flops("aten::addmm_", [[4, 3], [4, 8], [8, 3]]) == 2 * 4 * 8 * 3
    assert profile_linear._gemm_flops("aten::exp_", [[4, 3]]) == 0
