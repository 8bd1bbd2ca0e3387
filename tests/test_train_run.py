"""The trainer end to end on a tiny Llama: metrics, checkpoints, resume after SIGKILL, the
HF export, the reference cache, and a 2-process FSDP2 run against the 1-process run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fixtures import save_tiny_model, ultrafeedback_rows
from mixpo.train.checkpoint import complete_checkpoints
from mixpo.train.config import TrainConfig, build_config
from mixpo.train.metrics import read_metrics
from mixpo.train.trainer import train

REPO = Path(__file__).resolve().parent.parent
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
            "logps/rejected", "gamma/mean", "grad_norm", "learning_rate")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny model directory, 32 UltraFeedback-style pairs and a recipe for them."""
    root = tmp_path_factory.mktemp("tiny_run")
    rows = ultrafeedback_rows(32)
    save_tiny_model(root / "model", rows)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = root / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: {root / 'model'}\ntrain_file: {data}\n"
                      "max_length: 48\nmax_prompt_length: 16\nbeta: 0.1\nlearning_rate: 1.0e-3\n"
                      "global_batch_size: 8\nper_device_train_batch_size: 4\nlogging_steps: 1\n"
                      "progress_bar: false\n")
    return root, recipe


def run(recipe, output_dir, **overrides) -> list[dict]:
    train(build_config(TrainConfig, recipe, {"output_dir": str(output_dir), **overrides}))
    return read_metrics(output_dir)


def assert_same_trajectory(expected, actual, rel=1e-5):
    assert [row["step"] for row in actual] == [row["step"] for row in expected]
    for want, got in zip(expected, actual):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=rel, abs=1e-6), (want["step"], key)


def cli_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_mixdpo_gamma_po_run_metrics_checkpoints_and_export(tiny_run, tmp_path):
    root, recipe = tiny_run
    out = tmp_path / "run"
    metrics = run(recipe, out, max_steps=6, save_steps=3, difficulty="rating", route_below=1.0,
                  adaptive_margin=True, gamma=0.5, save_total_limit=1)
    assert [row["step"] for row in metrics] == list(range(1, 7))
    # The data layer's own routing of these pairs, easy-first: step k trains rows 8k..8k+7
    # (4 steps an epoch), and its routing/sft_fraction is the share of hard pairs there.
    import datasets
    from mixpo.data.difficulty import prepare_dataset
    prepared, _ = prepare_dataset(datasets.Dataset.from_list(ultrafeedback_rows(32)),
                                  route_below=1.0)
    hard = prepared["hard"]
    for row in metrics:
        rows = range(8 * ((row["step"] - 1) % 4), 8 * ((row["step"] - 1) % 4) + 8)
        assert row["routing/sft_fraction"] == sum(hard[i] for i in rows) / 8
        assert row["rewards/margins"] == pytest.approx(row["rewards/chosen"]
                                                       - row["rewards/rejected"], abs=1e-6)
        assert (row["rewards/accuracies"] * 8) % 1 == 0     # a share of the step's 8 pairs
        assert row["logps/chosen"] < 0 and row["logps/rejected"] < 0
        assert row["tokens_per_second"] > 0 and row["memory/peak_gb"] > 0
        assert row["grad_norm"] > 0 and row["gamma/mean"] >= 0 and row["loss"] > 0
    assert 0 < sum(hard) < 32                        # the tied pairs (margin 0 < 1.0) only
    # Step 1: the policy is the reference, and the warmup starts at 0.
    assert metrics[0]["rewards/margins"] == 0.0 and metrics[0]["learning_rate"] == 0.0
    assert any(row["gamma/std"] > 0 for row in metrics)  # per-pair adaptive margins
    assert [step for step, _ in complete_checkpoints(out)] == [6]  # save_total_limit=1
    state = torch.load(out / "checkpoint-6" / "rank_state_0.pt", weights_only=False)
    assert len(state["margin"]["queue"]) == 8 + 6 * 8  # initial queue + every pair's gap

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    initial = AutoModelForCausalLM.from_pretrained(root / "model")
    assert (out / "final" / "model.safetensors").is_file()
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), initial.parameters()))
    ids = tokenizer("why is the sky", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    # Rerunning a finished command does nothing.
    assert run(recipe, out, max_steps=6, save_steps=3, difficulty="rating", route_below=1.0,
               adaptive_margin=True, gamma=0.5, save_total_limit=1) == metrics


def test_reference_cache_and_live_reference_agree(tiny_run, tmp_path, capsys):
    _, recipe = tiny_run
    precomputed = run(recipe, tmp_path / "a", max_steps=3)
    assert "reference log-probs: computed" in capsys.readouterr().out
    cache = torch.load(tmp_path / "a" / "reference_logps.pt", weights_only=True)
    assert cache["chosen"].shape == (32,) and torch.all(cache["chosen"] < 0)
    # A longer run of the same data and model reuses them; other settings are refused.
    run(recipe, tmp_path / "a", max_steps=4)
    assert "reference log-probs: cached" in capsys.readouterr().out
    with pytest.raises(ValueError, match="holds a run with other settings "
                                         r"\(max_length: 48 -> 40\)"):
        run(recipe, tmp_path / "a", max_steps=4, max_length=40)
    live = run(recipe, tmp_path / "b", max_steps=3, reference="live")
    assert_same_trajectory(precomputed, live)


def test_reference_cache_key_follows_model_tokens_and_dtype(tiny_run):
    from transformers import AutoTokenizer

    from mixpo.data.tokenize import tokenize_rows
    from mixpo.train.ref_logps import cache_key

    root, _ = tiny_run
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    rows = ultrafeedback_rows(32)
    examples = tokenize_rows(rows, tokenizer, max_length=48, max_prompt_length=16)
    key = cache_key(str(root / "model"), torch.float32, examples)
    assert key == cache_key(str(root / "model"), torch.float32,
                            tokenize_rows(rows, tokenizer, 48, 16))
    assert key != cache_key(str(root / "model"), torch.bfloat16, examples)
    assert key != cache_key(str(root / "model"), torch.float32,
                            tokenize_rows(rows, tokenizer, 20, 8))
    assert key != cache_key(str(root / "model"), torch.float32,
                            tokenize_rows(rows[::-1], tokenizer, 48, 16))
    weights = root / "model" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert key != cache_key(str(root / "model"), torch.float32, examples)


def test_step_in_backward_matches_a_normal_step(tiny_run, tmp_path):
    _, recipe = tiny_run
    common = dict(max_steps=4, per_device_train_batch_size=8, max_grad_norm=0.0)
    normal = run(recipe, tmp_path / "normal", **common)
    stepped = run(recipe, tmp_path / "stepped", step_in_backward=True, **common)
    assert_same_trajectory(normal, stepped)
    with pytest.raises(ValueError, match="step_in_backward needs one backward per step"):
        run(recipe, tmp_path / "bad", step_in_backward=True, max_steps=2, max_grad_norm=0.0)


def test_padding_free_run_follows_the_padded_run(tiny_run, tmp_path):
    """Packed micro-batches (one row, attention within each sequence) train on the same
    trajectory as padded ones, routing and adaptive margins included."""
    _, recipe = tiny_run
    common = dict(max_steps=4, difficulty="rating", route_below=1.0, adaptive_margin=True,
                  gamma=0.5, ld_alpha=0.7)
    padded = run(recipe, tmp_path / "padded", **common)
    packed = run(recipe, tmp_path / "packed", padding_free=True, **common)
    assert_same_trajectory(padded, packed, rel=1e-4)
    # Fewer tokens are processed per second on padding... and none are counted: real tokens.
    assert packed[0]["tokens_per_second"] > 0


def test_mixed_precision_keeps_fp32_master_weights(tiny_run, tmp_path):
    """bf16: true (Hugging Face's meaning): fp32 weights and AdamW states, bf16 compute."""
    _, recipe = tiny_run
    from mixpo.train.config import build_config as build
    cfg = build(TrainConfig, recipe, {"output_dir": str(tmp_path / "amp"), "bf16": "true",
                                      "max_steps": 3, "save_steps": 3})
    assert (cfg.mixed_precision, cfg.dtype) == ("bf16", "auto")
    train(cfg)
    metrics = read_metrics(tmp_path / "amp")
    full = run(recipe, tmp_path / "fp32", max_steps=3)
    # bf16 compute: close to the fp32 run, not identical.
    assert metrics[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=5e-2)
    assert metrics[-1]["loss"] != full[-1]["loss"]
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "amp" / "final").dtype == torch.float32
    with pytest.raises(ValueError, match="keeps fp32 weights"):
        build(TrainConfig, recipe, {"mixed_precision": "bf16", "dtype": "bfloat16"})


def test_group_by_length_sorts_only_inside_windows(tiny_run, tmp_path, capsys):
    from mixpo.train.trainer import group_by_length
    examples = [{"chosen_input_ids": [0] * n, "rejected_input_ids": [0] * (n % 3), "i": i}
                for i, n in enumerate([5, 1, 4, 9, 2, 8, 3])]
    grouped = group_by_length(examples, 3)
    assert [e["i"] for e in grouped] == [1, 2, 0, 4, 3, 5, 6]   # windows {0,1,2} {3,4,5} {6}
    assert "moved (never across a window)" in capsys.readouterr().out
    _, recipe = tiny_run
    run(recipe, tmp_path / "grouped", max_steps=2, group_by_length=4, padding_free=True)
    assert "group_by_length: pairs sorted by length inside windows of 4" in \
        capsys.readouterr().out


@pytest.mark.parametrize("optim", ["adamw_bf16", "adamw_8bit"])
def test_bf16_and_8bit_optimizer_states_resume_exactly(tiny_run, tmp_path, optim):
    """BF16StateAdamW's bf16 moments and the RNG its stochastic rounding draws from, and
    torchao's 8-bit moments (codes and block scales), come back from the checkpoint, so a
    resumed run repeats the uninterrupted one bit for bit."""
    if optim == "adamw_8bit":
        pytest.importorskip("torchao.optim")
    _, recipe = tiny_run
    out = tmp_path / optim
    settings = dict(max_steps=6, save_steps=3, optim=optim)
    uninterrupted = run(recipe, out, **settings)
    for path in (out / "final", out / "checkpoint-6"):
        shutil.rmtree(path)
    resumed = run(recipe, out, **settings)
    assert resumed == [{**row, "tokens_per_second": resumed[i]["tokens_per_second"],
                        "memory/peak_gb": resumed[i]["memory/peak_gb"]}
                       for i, row in enumerate(uninterrupted)]


def test_sigkill_mid_run_then_rerun_resumes_on_the_same_trajectory(tiny_run, tmp_path):
    _, recipe = tiny_run
    settings = ["--max_steps", "40", "--save_steps", "4"]
    reference = run(recipe, tmp_path / "uninterrupted", max_steps=40, save_steps=4)

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "mixpo", "train", str(recipe), "--output_dir", str(out),
               *settings]
    process = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not complete_checkpoints(out) and process.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr[-2000:]
    assert not (out / "final").exists()
    killed_at = complete_checkpoints(out)[-1][0]
    assert killed_at < 40

    resumed = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {out / f'checkpoint-{killed_at}'}" in resumed.stdout
    assert not list(out.glob(".checkpoint-*.tmp"))
    assert_same_trajectory(reference, read_metrics(out), rel=1e-6)


def test_two_process_fsdp_run_follows_the_one_process_run(tiny_run, tmp_path):
    _, recipe = tiny_run
    single = run(recipe, tmp_path / "one", max_steps=4, save_steps=2)
    out = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "mixpo", "train", str(recipe), "--output_dir",
               str(out), "--max_steps", "4", "--save_steps", "2",
               "--per_device_train_batch_size", "2"]
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_trajectory(single, read_metrics(out))
    assert {p.name for p in (out / "checkpoint-4").iterdir()} >= {"rank_state_0.pt",
                                                                 "rank_state_1.pt", "state"}
    from transformers import AutoModelForCausalLM
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final")
    two = AutoModelForCausalLM.from_pretrained(out / "final")
    for a, b in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
