"""Roofline model (benchmarks/roofline.py) against hand-computed numbers, its report script,
and `mixpo bench`."""
import dataclasses
import json
import os
from pathlib import Path

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
    grad = roofline.kernel_cost("linear_softmax_grad", SMALL)
    gemms = roofline.kernel_cost("linear_bwd_gemms", SMALL)
    buffers = roofline.kernel_cost("linear_bwd_buffers", SMALL)
    assert forward.matmul_flops == grad.matmul_flops == 2e8      # 2 n V H each
    assert gemms.matmul_flops == 4e8 and gemms.engine == "cublas"
    assert buffers.matmul_flops == 0
    assert roofline.kernel_cost("linear_logps_fwd_bwd", SMALL).matmul_flops == 8e8
    assert roofline.kernel_cost("matmul_flop_floor_fwd_bwd", SMALL).matmul_flops == 6e8
    assert roofline.kernel_cost("matmul_flop_floor_8nvh", SMALL).matmul_flops == 8e8
    # 5 ops per logit of a tile (no label ops in the tile loop) and, for the label logit
    # hidden[row] . weight[label], 4 per (token, hidden unit): 2 bf16 casts, multiply, sum.
    assert forward.vector_ops == 5e6 + 4e5
    assert forward.special_ops == n * V
    # Forward bytes: hidden 2e5 + weight 2e5 (8 token tiles of 128 fit L2: one pass over
    # it); torch label scan N*10 + rows write n*8 and compaction n*24; kernel rows and
    # labels n*16, partial lse and label logit n*8; torch log-prob n*12; sequence sums:
    # rows // T n*16, index_add_ n*12, [2B] fill + add 3*2*4.
    assert forward.total_bytes == 2e5 + 2e5 + 1e4 + 8e3 + 2.4e4 + 1.6e4 + 8e3 + 1.2e4 \
        + 1.6e4 + 1.2e4 + 24
    # Every 128 x 128 tile streams 128 hidden and 128 weight rows of H from L2.
    assert forward.total_l2_bytes == pytest.approx(n * V * H * 2 * (2 / 128))
    # Gradient kernel: one vocab chunk (256 MiB holds [1000, 1000]), one token group: hidden
    # 2e5, weight 2e5, rows/labels/lse/coef n*24, G written once in bf16 n*V*2.
    assert roofline.vocab_chunks(SMALL) == 1
    assert grad.total_bytes == 2e5 + 2e5 + 2.4e4 + 2e6
    # Per logit: 6 listed ops and the cast of G to bf16; one exp.
    assert grad.vector_ops == 7 * n * V and grad.special_ops == n * V
    # GEMMs: G read by both 2*2e6, weight 2e5, hidden[rows] 2e5, dHidden fp32 accumulator
    # read + written 8e5, dWeight written once 2e5 (no fp32 [V, H], no atomics).
    assert gemms.total_bytes == 4e6 + 2e5 + 2e5 + 8e5 + 2e5 and gemms.total_l2_bytes == 0
    # Buffers: coef = grad_seq[sequence] n*20 + 2B*4, hidden[rows] copy n*8 + 2*n*H*2,
    # dHidden fill N*H*2, fp32 accumulator fill n*H*4, cast n*H*6, scatter n*8 + 2*n*H*2.
    assert buffers.total_bytes == 2.0008e4 + 4.08e5 + 2e5 + 4e5 + 6e5 + 4.08e5


def test_linear_path_floors_and_predictions_on_h100_and_a100():
    # H100, small H: the forward's L2 tile reloads (3.125e6 B at 10 TB/s) outweigh its
    # matmuls (2e8 / 800e12); at H = 100 the GEMMs (G read twice: 5.4e6 B in all) and the
    # buffers (2.036008e6 B) are memory-bound.
    l2 = n * V * H * 2 * (2 / 128)
    assert roofline.floor_seconds("linear_logps_fwd", SMALL, "h100") == pytest.approx(l2 / 10e12)
    assert roofline.kernel_cost("linear_logps_fwd", SMALL).bound(
        roofline.DEVICES["h100"], "bf16") == "l2"
    assert roofline.floor_seconds("linear_bwd_gemms", SMALL, "h100") == \
        pytest.approx(5.4e6 / 3e12)
    assert roofline.floor_seconds("linear_bwd_buffers", SMALL, "h100") == \
        pytest.approx(2.036008e6 / 3e12)
    # Predictions run the matmuls at the stated efficiency (cuBLAS 0.9, Triton 0.75): the
    # memory-bound GEMMs keep their floor, the forward's matmuls now outweigh its L2 time.
    assert roofline.predict_seconds("linear_bwd_gemms", SMALL, "h100") == \
        pytest.approx(5.4e6 / 3e12)
    assert roofline.predict_seconds("linear_logps_fwd", SMALL, "h100") == \
        pytest.approx(2e8 / (0.75 * 800e12))
    # A total is its parts run one after another.
    parts = ("linear_logps_fwd", "linear_softmax_grad", "linear_bwd_gemms",
             "linear_bwd_buffers")
    for device in ("h100", "a100"):
        for measure in (roofline.floor_seconds, roofline.predict_seconds):
            assert measure("linear_logps_fwd_bwd", SMALL, device) == pytest.approx(
                sum(measure(part, SMALL, device) for part in parts))
    assert roofline.floor_seconds("matmul_flop_floor_fwd_bwd", SMALL, "a100") == \
        pytest.approx(6e8 / 312e12)


def test_llama3_predictions_default_within_125_of_its_flop_floor():
    """The issue's headline: Llama-3-8B's head, 16k tokens of which 25 % prompt, bf16. The
    default (two passes, 8nVH) is predicted within 1.25x of its FLOP floor on H100 and A100;
    the old atomic design more than 2x; trl's head and the one pass beside them."""
    workload = roofline.make_workload("llama-3-8b", tokens=16384, prompt_share=0.25)
    assert workload.completion_tokens == 12288
    rows = {(row["device"], row["kernel"]): row for row in roofline.predictions(workload)}
    for device in ("h100", "a100"):
        default = rows[device, "linear_logps_fwd_bwd"]
        assert default["flop_floor"] == "matmul_flop_floor_8nvh"
        assert 1.0 < default["x_flop_floor"] <= 1.25
        assert rows[device, "linear_old_fwd_bwd"]["x_flop_floor"] > 2.0
        assert rows[device, "linear_one_pass_fwd_bwd"]["flop_floor"] == \
            "matmul_flop_floor_fwd_bwd"
        assert rows[device, "trl_head_fwd_bwd"]["predicted_ms"] > 0
    # The counts for the old design: 96,192 programs x 4 MiB of fp32 atomics.
    atomic = roofline.kernel_cost("linear_atomic_bwd", workload)
    assert atomic.l2_bytes["fp32 atomics"] == pytest.approx(96192 * 256 * 4096 * 4)
    assert atomic.serial
    # The old forward re-reads hidden per 128-wide vocab tile: 1002 x 100.7 MB.
    old = roofline.kernel_cost("linear_fwd_old", workload)
    assert old.bytes_moved["hidden read (completion rows)"] == 12288 * 4096 * 2 * 1002
    # The default backward: 12 vocab chunks of 10,880 rows in 256 MiB, G written once.
    grad = roofline.kernel_cost("linear_softmax_grad", workload)
    assert roofline.vocab_chunks(workload) == 12
    assert grad.bytes_moved["workspace G write"] == 12288 * 128256 * 2
    # A workspace of 1 GiB holds 2,093 tokens of fp32 logits: one pair (1,536 completion
    # tokens) per group, 8 groups, nothing recomputed, 6nVH; dWeight accumulates in fp32.
    big = dataclasses.replace(workload, workspace_bytes=2**30)
    assert roofline.one_pass_groups(big) == 8 and roofline.one_pass_recomputed(big) == 0
    one = roofline.kernel_cost("linear_one_pass_gemms", big)
    assert one.matmul_flops == 6 * 12288 * 128256 * 4096
    assert "dWeight fp32 accumulator (fill, read + write per block, cast)" in one.bytes_moved
    # The default 256 MiB holds 523 tokens: each pair recomputes 1,013 of its 1,536.
    assert roofline.one_pass_recomputed(workload) == 8 * (1536 - 523)
    one = roofline.kernel_cost("linear_one_pass_gemms", workload)
    assert one.matmul_flops == (6 * 12288 + 2 * 8 * 1013) * 128256 * 4096


def test_fp32_matmul_rates():
    small_fp32 = roofline.Workload(SMALL.shape, N, n, 1, dtype="fp32")
    # The logit-free kernels' fp32 products are tf32x3: a third of the TF32 peak (A100 156).
    grad = roofline.kernel_cost("linear_softmax_grad", small_fp32)
    assert grad.seconds_by_resource(roofline.DEVICES["a100"], "fp32")["matmul"] == \
        pytest.approx(2e8 / (156e12 / 3))
    # torch's fp32 GEMM runs on the CUDA cores (19.5 TFLOP/s on A100).
    assert roofline.floor_seconds("lm_head_fwd", small_fp32, "a100") == \
        pytest.approx(2e8 / 19.5e12)


def test_casts_and_gradient_filter_in_linear_counts():
    small_fp32 = roofline.Workload(SMALL.shape, N, n, 1, dtype="fp32")
    # fp32 loads need no cast: the label logit does 2 ops per (token, hidden unit), the
    # gradient kernel 6 per logit (no cast of G).
    assert roofline.kernel_cost("linear_logps_fwd", small_fp32).vector_ops == 5e6 + 2e5
    assert roofline.kernel_cost("linear_softmax_grad", small_fp32).vector_ops == 6 * n * V
    # CCE's filter keeps a quarter of the atomic backward's tiles: every tile is still
    # recomputed and tested; only the kept ones run the products and their atomics.
    skipping = roofline.Workload(SMALL.shape, N, n, 1, kept_tile_fraction=0.25)
    atomic = roofline.kernel_cost("linear_atomic_bwd", skipping)
    assert atomic.vector_ops == pytest.approx((7 + 0.25 * 3) * n * V)
    assert atomic.matmul_flops == pytest.approx(2e8 + 0.25 * 4e8)
    assert atomic.l2_bytes["fp32 atomics"] == pytest.approx(0.25 * n * V * H * 4 * (2 / 128))


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
    # The gradient kernel's 128 x 128 tiles (the largest without spills) stream 202 GB from
    # L2: at the assumed 10 TB/s its floor is L2-bound (its prediction, with the matmuls at
    # 75 %, is matmul-bound again); the forward's 256 x 128 tiles stay matmul-bound.
    grad_l2 = completion_flops * 2 * (2 / 128)
    assert roofline.floor_seconds("linear_softmax_grad", workload, "h100") == \
        pytest.approx(grad_l2 / 10e12)
    assert roofline.predict_seconds("linear_softmax_grad", workload, "h100") == \
        pytest.approx(2 * completion_flops / (0.75 * 800e12))
    assert roofline.floor_seconds("linear_bwd_gemms", workload, "h100") == \
        pytest.approx(4 * completion_flops / 800e12)
    assert roofline.predict_seconds("linear_bwd_gemms", workload, "h100") == \
        pytest.approx(4 * completion_flops / (0.9 * 800e12))
    buffers = roofline.kernel_cost("linear_bwd_buffers", workload).total_bytes
    assert roofline.floor_seconds("linear_logps_fwd_bwd", workload, "h100") == \
        pytest.approx(6 * completion_flops / 800e12 + grad_l2 / 10e12 + buffers / 3e12)
    assert roofline.floor_seconds("matmul_flop_floor_fwd_bwd", workload, "h100") == \
        pytest.approx(6 * completion_flops / 800e12)


def test_prompt_share_shrinks_linear_work_not_logits_path_writes():
    # A workspace that holds every pair: the one pass recomputes nothing (its recomputed
    # share is not linear in the tokens).
    full = roofline.make_workload("qwen-2.5-7b", 8192, prompt_share=0.0, workspace_bytes=2**34)
    half = roofline.make_workload("qwen-2.5-7b", 8192, prompt_share=0.5, workspace_bytes=2**34)
    for kernel in ("linear_logps_fwd", "linear_logps_bwd", "linear_one_pass_gemms",
                   "matmul_flop_floor_fwd_bwd"):
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
    for kernel in ("pair_head", "margin_solve"):
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
        roofline.floor_seconds("pair_head", SMALL, "tpu")
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
    assert row["parts"] == ["linear_logps_fwd", "linear_softmax_grad", "linear_bwd_gemms",
                            "linear_bwd_buffers"]
    parts = [part for part in report["rows"] if part["kernel"] in row["parts"]
             and part["tokens"] == 16384 and part["prompt_share"] == 0.25
             and part["shape"] == "llama-3-8b"]
    assert row["floor_seconds"]["h100"] == pytest.approx(
        sum(part["floor_seconds"]["h100"] for part in parts))
    assert row["floor_seconds"]["h100"] > 8 * 12288 * 128256 * 4096 / 800e12
    table = capfd.readouterr().out  # printed by the script's subprocess
    assert "linear_logps_fwd_bwd" in table and "16384 tokens, 25 % prompt" in table
    assert "mixpo default (two passes)" in table and "trl 1.16 fused head" in table
    predicted = report["predictions"]["rows"]
    assert {r["device"] for r in predicted} == {"a100", "h100"} and len(predicted) == 8
    assert "note: shape 'gemma2' is now called 'gemma-2-9b'" in table


def test_cli_roofline_prints_and_writes_nothing_by_default(tmp_path, monkeypatch, capfd):
    # The tracked benchmarks/results/roofline.json is rewritten only when asked (--json).
    tracked = Path(roofline.__file__).resolve().parent / "results" / "roofline.json"
    before = tracked.read_bytes()
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "roofline", "--shapes", "llama-3-8b", "--tokens", "2048",
                 "--prompt-share", "0"]) == 0
    out = capfd.readouterr().out
    assert "linear_logps_fwd_bwd" in out and "wrote" not in out
    assert tracked.read_bytes() == before and not list(tmp_path.iterdir())
    assert main(["bench", "roofline", "--shapes", "llama-3-8b", "--tokens", "2048",
                 "--prompt-share", "0", "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["rows"]


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
                                      "margin_solve", "--json", json_path])
    assert args.func(args) == 0
    (command, env), = calls
    assert command[1:] == ["-m", "mixpo.kernels.compile_check", "--arch", "90", "--kernel",
                           "margin_solve", "--json", json_path]
    assert "TRITON_INTERPRET" not in env and env.get("PATH") == os.environ.get("PATH")
    args = build_parser().parse_args(["bench", "compile", "--kernel", "no_such_kernel"])
    with pytest.raises(ValueError, match="no_such_kernel"):
        args.func(args)


def test_prefix_sharing_body_saving():
    """Prefix sharing's body model: a 150-token prompt before two 300-token responses runs
    2*150 + 600 = 900 body tokens unshared and 750 shared (1/6 fewer linear FLOPs); the
    attention saving is the prompt's own square, once."""
    from roofline import ULTRAFEEDBACK_MEANS, prefix_sharing_body

    row = prefix_sharing_body(**ULTRAFEEDBACK_MEANS)
    assert (row["body_tokens_unshared"], row["body_tokens_shared"]) == (900, 750)
    assert row["linear_flop_saving"] == pytest.approx(1 / 6)
    assert row["attention_flop_saving"] == pytest.approx(150 ** 2 / 2 / (2 * 450 ** 2 / 2))
    assert prefix_sharing_body(0.0, 5.0, 7.0)["linear_flop_saving"] == 0.0
