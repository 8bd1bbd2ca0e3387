"""benchmarks/gpu_check.py cannot rot: its --quick CPU mode (tiny shapes, Triton under
TRITON_INTERPRET=1, peers that need CUDA skipped) runs every stage end to end here, and the
helpers the GPU run relies on (NaN poisoning of kernel outputs, the error measure, the
tolerant trainer-config builder) are checked directly."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_check
import gpu_stage_training

REPO = Path(__file__).resolve().parent.parent
STAGE_NAMES = [stage[0] for stage in gpu_check.STAGES]


def test_quick_mode_runs_every_stage_and_prints_the_summary_last(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(out.glob("*.log")))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + logs

    report = json.loads((out / "gpu_check.json").read_text())
    assert [stage["stage"] for stage in report["stages"]] == STAGE_NAMES
    for stage in report["stages"]:
        assert stage["verdict"] in ("pass", "fail", "skipped"), stage
        assert stage["headline"] and stage["seconds"] <= stage["budget_s"] + 5, stage
    verdicts = {stage["stage"]: stage for stage in report["stages"]}
    correctness = verdicts["correctness"]
    assert correctness["verdict"] == "pass", correctness["headline"]
    cases = correctness["details"]["cases"]
    kinds = {case["kind"] for case in cases}
    assert kinds == {"linear", "logits", "pair_loss", "margin_solve", "api"}
    assert all(case["pass"] and case["runs"] >= 1 for case in cases)
    assert report["thresholds"]["bfloat16"] > report["thresholds"]["float32"]
    # Every loss type with a pair-kernel code is covered.
    from mixpo.loss_spec import LOSS_TYPES
    covered = {case["case"].split()[1] for case in cases if case["kind"] == "pair_loss"}
    assert {name for name, spec in LOSS_TYPES.items() if spec.kernel_code is not None} <= covered
    # Peers that need CUDA are recorded as skipped with a reason, not as failures.
    impls = verdicts["linear_loss"]["details"]["impls"]
    assert "forward_backward" in impls["mixpo"]
    for peer in ("liger", "cce"):
        assert impls[peer]["skipped"], impls[peer]
    assert verdicts["training"]["details"]["summary"]["mixpo"]["tokens_per_s"] > 0
    assert (out / "gpu_check.md").read_text().count("| stage | verdict |") == 1

    # One verdict line per stage, in order, then the summary table and nothing after it.
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    verdict_lines = [i for i, line in enumerate(lines) if line.startswith("[")]
    assert [lines[i].split()[1] for i in verdict_lines] == STAGE_NAMES
    header = max(i for i, line in enumerate(lines) if line.startswith("| stage | verdict |"))
    assert header > verdict_lines[-1]
    table = lines[header:]
    assert all(line.startswith("|") for line in table)
    assert table[-1].startswith("| total | PASS")
    assert len(table) == 2 + len(STAGE_NAMES) + 1


def test_poisoned_outputs_fill_new_float_tensors_with_nan_and_restore_torch():
    empty, empty_like = torch.empty, torch.empty_like
    with gpu_check.poisoned_outputs():
        assert torch.isnan(torch.empty(3, 4)).all()
        assert torch.isnan(torch.empty_like(torch.zeros(5), dtype=torch.bfloat16)).all()
        assert torch.empty(2, dtype=torch.int64).shape == (2,)       # ints left as they are
    assert torch.empty is empty and torch.empty_like is empty_like


def test_rel_error_flags_unwritten_elements_and_shape_mismatches():
    expected = torch.tensor([1.0, -2.0, 4.0])
    error, bad = gpu_check.rel_error(expected + 0.004, expected)
    assert error == pytest.approx(0.001, rel=1e-3) and bad == 0
    assert gpu_check.rel_error(torch.tensor([1.0, float("nan"), 4.0]), expected) == (math.inf, 1)
    assert gpu_check.rel_error(expected[:2], expected)[0] == math.inf


def test_train_config_builder_drops_unknown_keys_and_keeps_the_rest():
    cfg, dropped = gpu_stage_training.build_train_config(
        {"model_name_or_path": "some/model", "beta": 0.01, "a_renamed_field": 3})
    assert dropped == ["a_renamed_field"]
    assert cfg.model_name_or_path == "some/model" and cfg.beta == 0.01
