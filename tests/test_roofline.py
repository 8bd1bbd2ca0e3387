"""Roofline model (benchmarks/roofline.py) against hand-computed numbers, its report script,
and `mixpo bench`."""
import json
import os

import pytest
import roofline  # benchmarks/ (conftest puts it on sys.path)
import roofline_report

from mixpo.cli import build_parser, main

# One small problem, counted by hand: N = n = 1000 tokens, V = 1000, H = 100, bf16, 1 pair.
N = n = 1000
V, H = 1000, 100
SMALL = roofline.Workload(roofline.ModelShape("small", H, V), tokens=N, completion_tokens=n,
                          pairs=1, dtype="bf16")
H100_VECTOR_OPS_PER_S = 66.9e12 / 2
H100_SFU_PER_S = 132 * 16 * 1.98e9
A100_VECTOR_OPS_PER_S = 19.5e12 / 2
A100_SFU_PER_S = 108 * 16 * 1.41e9


def test_linear_path_counts_match_hand_arithmetic():
    forward = roofline.kernel_cost("linear_logps_fwd", SMALL)
    softmax = roofline.kernel_cost("linear_softmax_bwd", SMALL)
    label = roofline.kernel_cost("linear_label_bwd", SMALL)
    buffers = roofline.kernel_cost("linear_bwd_buffers", SMALL)
    assert forward.matmul_flops == 2e8                   # 2 n V H
    assert softmax.matmul_flops == 6e8                   # recompute + dHidden + dWeight
    assert label.matmul_flops == buffers.matmul_flops == 0
    assert roofline.kernel_cost("linear_logps_fwd_bwd", SMALL).matmul_flops == 8e8
    assert roofline.kernel_cost("matmul_flop_floor_fwd_bwd", SMALL).matmul_flops == 6e8
    # 5 ops per logit of a tile (no label ops in the tile loop) and, for the label logit
    # hidden[row] . weight[label], 4 per (token, hidden unit): 2 bf16 casts, multiply, sum.
    assert forward.vector_ops == 5e6 + 4e5
    assert forward.special_ops == n * V
    # Forward bytes: hidden 2e5 + weight 2e5; torch label scan N*10 + rows write n*8 and
    # compaction n*24; kernel rows and labels n*16, partial lse and label logit n*8; torch
    # log-prob n*12; sequence sums: rows // T n*16, index_add_ n*12, [2B] fill + add 3*2*4.
    assert forward.total_bytes == 2e5 + 2e5 + 1e4 + 8e3 + 2.4e4 + 1.6e4 + 8e3 + 1.2e4 \
        + 1.6e4 + 1.2e4 + 24
    # Softmax backward: hidden 2e5, weight 2e5, rows/lse/coef n*16, dHidden fp32 atomics
    # 2*n*H*4 = 8e5, dWeight fp32 atomics 2*V*H*4 = 8e5.
    assert softmax.total_bytes == 2e5 + 2e5 + 1.6e4 + 8e5 + 8e5
    # Softmax backward per logit: select, subtract lse, scale, mass sum on every tile; on kept
    # tiles, times -coefficient and the bf16 cast of G.
    assert softmax.vector_ops == (4 + 2) * n * V and softmax.special_ops == n * V
    # Label backward: hidden 2e5, weight[label] rows (1000 distinct) 2e5, rows/labels/coef
    # n*20, dHidden atomics 8e5, dWeight[label] atomics 8e5.
    assert label.total_bytes == 2e5 + 2e5 + 2e4 + 8e5 + 8e5
    # Label backward per (token, hidden unit): two bf16 casts and two products, no matmul.
    assert label.vector_ops == 4 * n * H and label.special_ops == 0
    # Buffers: coef = grad_seq[rows // T] n*24 + n*4 + 2B*4, dHidden zero fill N*H*2,
    # dWeight fp32 zero fill V*H*4, dHidden fp32 buffer zero fill n*H*4, cast to a temporary
    # n*H*6, scatter n*8 + n*H*4, dWeight cast V*H*6.
    assert buffers.total_bytes == 2.8008e4 + 2e5 + 4e5 + 4e5 + 6e5 + 4.08e5 + 6e5


def test_linear_path_floors_on_h100_and_a100():
    # H100: forward and softmax backward are matmul-bound (vector 5.4e6 ops / 33.45e12,
    # SFU 1e6 / 4.18e12 and memory 5.1e5 B / 3e12 are below 2e8 / 800e12); at H = 100 the
    # label backward (2.02e6 B) and the buffers (2.636008e6 B) are memory-bound.
    h100 = {kernel: roofline.floor_seconds(kernel, SMALL, "h100") for kernel in
            ("linear_logps_fwd", "linear_softmax_bwd", "linear_label_bwd",
             "linear_bwd_buffers", "linear_logps_fwd_bwd")}
    assert h100["linear_logps_fwd"] == pytest.approx(2e8 / 800e12)
    assert 5.4e6 / H100_VECTOR_OPS_PER_S < h100["linear_logps_fwd"]
    assert 1e6 / H100_SFU_PER_S < h100["linear_logps_fwd"]
    assert h100["linear_softmax_bwd"] == pytest.approx(6e8 / 800e12)
    assert h100["linear_label_bwd"] == pytest.approx(2.02e6 / 3e12)
    assert h100["linear_bwd_buffers"] == pytest.approx(2.636008e6 / 3e12)
    assert roofline.kernel_cost("linear_label_bwd", SMALL).bound(
        roofline.DEVICES["h100"], "bf16") == "memory"
    # A total is its parts run one after another.
    assert h100["linear_logps_fwd_bwd"] == pytest.approx(
        8e8 / 800e12 + (2.02e6 + 2.636008e6) / 3e12)
    # A100: the forward's SFU work (1e6 exp at 2.44e12/s) stays below its matmul time.
    assert roofline.floor_seconds("linear_logps_fwd", SMALL, "a100") == pytest.approx(
        2e8 / 312e12)
    assert 1e6 / A100_SFU_PER_S < 2e8 / 312e12
    assert roofline.floor_seconds("matmul_flop_floor_fwd_bwd", SMALL, "a100") == \
        pytest.approx(6e8 / 312e12)


def test_fp32_matmul_rates():
    small_fp32 = roofline.Workload(SMALL.shape, N, n, 1, dtype="fp32")
    # The logit-free kernels' fp32 products are tf32x3: a third of the TF32 peak (A100 156).
    assert roofline.floor_seconds("linear_softmax_bwd", small_fp32, "a100") == \
        pytest.approx(6e8 / (156e12 / 3))
    # torch's fp32 GEMM runs on the CUDA cores (19.5 TFLOP/s on A100).
    assert roofline.floor_seconds("lm_head_fwd", small_fp32, "a100") == \
        pytest.approx(2e8 / 19.5e12)


def test_casts_and_softmax_mass_filter_in_linear_counts():
    small_fp32 = roofline.Workload(SMALL.shape, N, n, 1, dtype="fp32")
    # fp32 loads need no cast: the label logit and the label backward do 2 ops per (token,
    # hidden unit), the softmax backward 5 per logit (no cast of G).
    assert roofline.kernel_cost("linear_logps_fwd", small_fp32).vector_ops == 5e6 + 2e5
    assert roofline.kernel_cost("linear_label_bwd", small_fp32).vector_ops == 2 * n * H
    assert roofline.kernel_cost("linear_softmax_bwd", small_fp32).vector_ops == 5 * n * V
    # A quarter of the tiles pass the softmax-mass filter: every tile is still recomputed,
    # exponentiated and summed; only the kept ones form G (multiply, bf16 cast) and run the
    # dHidden / dWeight products.
    skipping = roofline.Workload(SMALL.shape, N, n, 1, kept_tile_fraction=0.25)
    softmax = roofline.kernel_cost("linear_softmax_bwd", skipping)
    assert softmax.vector_ops == pytest.approx((4 + 0.25 * 2) * n * V)
    assert softmax.special_ops == n * V
    assert softmax.matmul_flops == pytest.approx(2e8 + 0.25 * 4e8)


def test_logits_path_prompt_rows_run_the_loop_but_are_not_read():
    half = roofline.Workload(SMALL.shape, tokens=N, completion_tokens=n // 2, pairs=1)
    forward = roofline.kernel_cost("token_logps_fwd", half)
    backward = roofline.kernel_cost("token_logps_bwd", half)
    # No early exit: every row's program runs the vocab loop on its (masked) block.
    assert forward.vector_ops == 10 * N * V and forward.special_ops == N * V
    # 10 listed ops (load and store masks included) + bf16 load and store casts.
    assert backward.vector_ops == 12 * N * V and backward.special_ops == N * V
    # Only completion rows are read; dlogits is written for every row.
    assert forward.bytes_moved["logits read (completion rows)"] == 500 * V * 2
    # read n*V*2 + write N*V*2 + labels N*8 + lse n*4 + sequence gradients 2B*4.
    assert backward.total_bytes == 1e6 + 2e6 + 8e3 + 2e3 + 8


def test_logits_path_counts_match_hand_arithmetic():
    forward = roofline.kernel_cost("token_logps_fwd", SMALL)
    backward = roofline.kernel_cost("token_logps_bwd", SMALL)
    # logits n*V*2, labels N*8, token log-probs + lse N*8, sequence sums N*4 + 2B*4.
    assert forward.total_bytes == 2e6 + 8e3 + 8e3 + 4e3 + 8
    assert forward.matmul_flops == 0 and forward.special_ops == n * V
    # 9 listed ops + one bf16 -> fp32 convert per logit.
    assert forward.vector_ops == 10 * n * V
    # read n*V*2 + write N*V*2 + labels N*8 + lse n*4 + sequence gradients 2B*4.
    assert backward.total_bytes == 2e6 + 2e6 + 8e3 + 4e3 + 8
    assert roofline.floor_seconds("token_logps_bwd", SMALL, "h100") == pytest.approx(
        (4e6 + 1.2e4 + 8) / 3e12)
    assert roofline.kernel_cost("lm_head_fwd", SMALL).matmul_flops == 2 * N * V * H


def test_large_shape_linear_path_is_matmul_bound_at_8nvh():
    workload = roofline.make_workload("llama-3-8b", tokens=16384, prompt_share=0.25)
    assert workload.completion_tokens == 12288 and workload.pairs == 8
    completion_flops = 12288 * 128256 * 4096
    assert roofline.floor_seconds("linear_logps_fwd", workload, "h100") == \
        pytest.approx(2 * completion_flops / 800e12)
    assert roofline.floor_seconds("linear_softmax_bwd", workload, "h100") == \
        pytest.approx(6 * completion_flops / 800e12)
    memory_parts = sum(roofline.kernel_cost(kernel, workload).total_bytes
                       for kernel in ("linear_label_bwd", "linear_bwd_buffers"))
    assert roofline.floor_seconds("linear_logps_fwd_bwd", workload, "h100") == \
        pytest.approx(8 * completion_flops / 800e12 + memory_parts / 3e12)
    assert roofline.floor_seconds("matmul_flop_floor_fwd_bwd", workload, "h100") == \
        pytest.approx(6 * completion_flops / 800e12)
    # Tile skipping in the backward removes dHidden/dWeight products only.
    skipping = roofline.make_workload("llama-3-8b", 16384, 0.25, kept_tile_fraction=0.25)
    assert roofline.kernel_cost("linear_logps_fwd_bwd", skipping).matmul_flops == \
        pytest.approx((2 + 2 + 0.25 * 4) * completion_flops)


def test_prompt_share_shrinks_linear_work_not_logits_path_writes():
    full = roofline.make_workload("qwen-2.5-7b", 8192, prompt_share=0.0)
    half = roofline.make_workload("qwen-2.5-7b", 8192, prompt_share=0.5)
    for kernel in ("linear_logps_fwd", "linear_logps_bwd", "matmul_flop_floor_fwd_bwd"):
        assert roofline.kernel_cost(kernel, half).matmul_flops == \
            pytest.approx(roofline.kernel_cost(kernel, full).matmul_flops / 2)
    # The LM head and the dlogits write cover every position whatever the prompt share.
    for kernel in ("lm_head_fwd", "lm_head_bwd"):
        assert roofline.kernel_cost(kernel, half).bytes_moved == \
            roofline.kernel_cost(kernel, full).bytes_moved
    write = "dlogits write (all rows)"
    assert roofline.kernel_cost("token_logps_bwd", half).bytes_moved[write] == \
        roofline.kernel_cost("token_logps_bwd", full).bytes_moved[write] == 8192 * 152064 * 2
    # token_logps's masked loads skip prompt rows: half the logits read.
    read = "logits read (completion rows)"
    assert roofline.kernel_cost("token_logps_fwd", half).bytes_moved[read] == \
        roofline.kernel_cost("token_logps_fwd", full).bytes_moved[read] / 2


def test_pair_kernels_are_negligible():
    workload = roofline.make_workload("gemma-2-9b", 32768, 0.25)
    lm_bytes = roofline.kernel_cost("token_logps_fwd", workload).total_bytes
    for kernel in ("pair_loss", "margin_solve"):
        assert roofline.kernel_cost(kernel, workload).total_bytes < 1e-5 * lm_bytes
        assert roofline.floor_seconds(kernel, workload, "a100") < 1e-4


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="shape"):
        roofline.make_workload("gpt9", 1024)
    with pytest.raises(ValueError, match="prompt_share"):
        roofline.make_workload("llama3", 1024, prompt_share=1.0)
    with pytest.raises(ValueError, match="pairs"):
        roofline.make_workload("llama3", 1024, prompt_share=0.5, pairs=400)
    with pytest.raises(ValueError, match="device"):
        roofline.floor_seconds("pair_loss", SMALL, "tpu")
    with pytest.raises(ValueError, match="kernel"):
        roofline.floor_seconds("attention", SMALL, "h100")
    with pytest.raises(ValueError, match="pairs-per-batch"):
        roofline_report.workloads(["llama-3-8b"], [2048, 4096, 8192], [0.0], pairs_per_batch=[1, 2])


def test_cli_roofline_writes_json_with_metadata(tmp_path, capfd):
    output = tmp_path / "results" / "roofline.json"
    code = main(["bench", "roofline", "--shapes", "llama-3-8b", "gemma2", "--tokens", "2048",
                 "16384", "--prompt-share", "0", "0.25", "-o", str(output)])
    assert code == 0
    report = json.loads(output.read_text())
    assert report["date"] and report["dtype"] == "bf16"
    assert set(report["versions"]) >= {"mixpo", "torch", "triton"}
    assert report["versions"]["mixpo"] and report["versions"]["torch"]
    assert report["devices"]["a100"]["tensor_flops_16bit"] == 312e12
    assert report["devices"]["h100"]["hbm_bytes_per_s"] == 3.0e12
    # "gemma2" is the old spelling of the plan's "gemma-2-9b" (one shape table).
    assert report["shapes"]["gemma-2-9b"] == {"name": "gemma-2-9b", "hidden_size": 3584,
                                              "vocab_size": 256000}
    assert len(report["rows"]) == 2 * 2 * 2 * len(roofline.KERNEL_MODELS)
    row = next(row for row in report["rows"] if row["kernel"] == "linear_logps_fwd_bwd"
               and row["tokens"] == 16384 and row["prompt_share"] == 0.25
               and row["shape"] == "llama-3-8b")
    assert row["matmul_flops_over_6nvh"] == pytest.approx(4 / 3)
    assert row["parts"] == ["linear_logps_fwd", "linear_softmax_bwd", "linear_label_bwd",
                            "linear_bwd_buffers"]
    parts = [part for part in report["rows"] if part["kernel"] in row["parts"]
             and part["tokens"] == 16384 and part["prompt_share"] == 0.25
             and part["shape"] == "llama-3-8b"]
    assert row["floor_seconds"]["h100"] == pytest.approx(
        sum(part["floor_seconds"]["h100"] for part in parts))
    assert row["floor_seconds"]["h100"] > 8 * 12288 * 128256 * 4096 / 800e12
    table = capfd.readouterr().out  # printed by the script's subprocess
    assert "linear_logps_fwd_bwd" in table and "16384 tokens, 25 % prompt" in table
    assert "note: shape 'gemma2' is now called 'gemma-2-9b'" in table


def test_cli_roofline_rejects_unknown_shape(tmp_path):
    assert main(["bench", "roofline", "--shapes", "gpt9", "-o", str(tmp_path / "r.json")]) == 2
    assert not (tmp_path / "r.json").exists()


def test_cli_compile_runs_compile_check_without_triton_interpret(monkeypatch, tmp_path):
    # The compile itself is tested in test_compile_gpu.py; here: the delegation.
    calls = []

    def fake_run(command, env):
        calls.append((command, env))

        class Finished:
            returncode = 0
        return Finished()

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr("subprocess.run", fake_run)
    json_path = str(tmp_path / "compile.json")
    args = build_parser().parse_args(["bench", "compile", "--arch", "90", "--kernel",
                                      "pair_loss", "--json", json_path])
    assert args.func(args) == 0
    (command, env), = calls
    assert command[1:] == ["-m", "mixpo.kernels.compile_check", "--arch", "90", "--kernel",
                           "pair_loss", "--json", json_path]
    assert "TRITON_INTERPRET" not in env and env.get("PATH") == os.environ.get("PATH")
    args = build_parser().parse_args(["bench", "compile", "--kernel", "no_such_kernel"])
    with pytest.raises(ValueError, match="no_such_kernel"):
        args.func(args)
