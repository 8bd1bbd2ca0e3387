"""MixpoDPOTrainer over several processes (torchrun, gloo on CPU; worker: fsdp2_trl_worker.py).

- FSDP2 as `accelerate launch` shards a model (accelerate's own `fsdp2_prepare_model`: a unit
  per decoder layer, the embedding, a [final norm, lm_head] tail, the root; tied and untied
  heads): the trainer's loss and every parameter gradient equal the unsharded model's with the
  gradients averaged over the ranks. accelerate turns FSDP on only for GPUs, so the layout is
  applied to the trainer's model directly.
- Data parallel training through TRL's loop: 2 processes train, log, write one gamma-PO solver
  state per rank into each checkpoint, resume onto the identical trajectory, and follow the
  1-process run with the same global batch.
- DeepSpeed (worker: deepspeed_trl_worker.py): MixpoDPOTrainer and stock trl DPOTrainer under
  the same ZeRO-3 configuration (untied and tied head, live and precomputed reference) and
  ZeRO-2 train to the same losses and grad norms.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("accelerate")

TESTS = Path(__file__).resolve().parent
WORKER = str(TESTS / "fsdp2_trl_worker.py")


def torchrun(processes: int, *arguments: str, worker: str = WORKER) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS),
                                         env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(processes), worker, *arguments]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("loss_type,tied", [("sigmoid", "untied"), ("ipo", "tied")])
def test_fsdp2_sharded_loss_and_gradients_equal_unsharded(tmp_path, loss_type, tied):
    out = str(tmp_path / "fsdp2")
    torchrun(2, out, loss_type, tied)
    results = [json.loads(Path(f"{out}.rank{rank}").read_text()) for rank in (0, 1)]
    for result in results:
        assert result["head_is_sharded"]                       # really sharded at rest
        assert result["sharded_loss"] == pytest.approx(result["plain_loss"], rel=1e-6)
        assert result["max_grad_error"] < 1e-5, result["worst"]
        assert result["grads"] == (20 if tied == "tied" else 21)
        assert result["routed"] >= 1                            # MixDPO routing was exercised
        # accelerate's [final norm, lm_head] unit is unsharded when the body's norm runs, so
        # the loss reads the full head weight in the forward (`_full` would gather a shard).
        assert result["head_weight_in_forward"] == "Parameter"
    # each rank saw its own half of the global batch
    assert results[0]["plain_loss"] != results[1]["plain_loss"]


def _trainer_resumes_cpu_ranks() -> bool:
    """transformers 5.17 (the GPU machine's) loads a rank's optimizer state onto
    `args.device`, "cpu:<rank>" on a CPU, which torch.load refuses; 5.24 (CI's) maps it to
    "cpu". Not mixpo's code, and no issue on GPUs."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version("5.24")


def test_two_processes_train_checkpoint_resume_and_follow_one(tmp_path):
    logs = {}
    modes = ("train", "resume") if _trainer_resumes_cpu_ranks() else ("train",)
    for processes in (2, 1):
        out = str(tmp_path / f"run{processes}")
        for mode in modes:
            torchrun(processes, out, mode)
            history = json.loads(Path(f"{out}.{mode}.json").read_text())
            assert history["world_size"] == processes
            logs[processes, mode] = [(row["step"], row["loss"], row["gamma/mean"])
                                     for row in history["log_history"] if "loss" in row]
        checkpoint = Path(out) / "checkpoint-2"
        assert sorted(path.name for path in checkpoint.glob("mixpo_margin_rank*.pt")) == \
            [f"mixpo_margin_rank{rank}.pt" for rank in range(processes)]
    for processes in (2, 1):
        assert [step for step, _, _ in logs[processes, "train"]] == [1, 2, 3, 4]
        if "resume" in modes:
            assert logs[processes, "resume"] == logs[processes, "train"]  # exact resume
        assert all(gamma == pytest.approx(0.5, abs=1e-3)
                   for _, _, gamma in logs[processes, "train"])
    # Same global batch, same order: 2 processes follow 1 up to gamma-PO's per-process solver
    # (each process keeps its own queue and seed, as the authors' code: |d gamma| ~ 1e-4).
    for (_, loss_two, _), (_, loss_one, _) in zip(logs[2, "train"], logs[1, "train"]):
        assert loss_two == pytest.approx(loss_one, abs=1e-3)


def test_deepspeed_zero3_and_zero2_train_as_stock_trl(tmp_path):
    """Stock trl 1.16 gathers the head around its fused call; MixpoDPOTrainer gathers it for
    its own (without, ZeRO-3 hands it a 0-element weight). 2 steps each from the same model:
    the losses and grad norms agree to fp32 rounding (measured: <= 5e-7 relative)."""
    pytest.importorskip("deepspeed")
    out = str(tmp_path / "ds")
    torchrun(2, out, worker=str(TESTS / "deepspeed_trl_worker.py"))
    results = json.loads(Path(f"{out}.json").read_text())
    cases = sorted({name.rsplit(".", 1)[0] for name in results})
    assert cases == ["zero2-untied-live", "zero3-tied-live", "zero3-tied-precomputed",
                     "zero3-untied-live", "zero3-untied-precomputed"]
    for case in cases:
        stock, mixpo = results[f"{case}.stock"], results[f"{case}.mixpo"]
        assert len(mixpo["losses"]) == len(mixpo["grad_norms"]) == 2, case
        assert mixpo["losses"] == pytest.approx(stock["losses"], rel=2e-6), case
        assert mixpo["grad_norms"] == pytest.approx(stock["grad_norms"], rel=2e-6), case
        assert mixpo["losses"][1] != mixpo["losses"][0]          # the first step trained
        # ZeRO-3 really partitions the head (0 elements at rest); ZeRO-2 does not.
        assert stock["head_partitioned"] == mixpo["head_partitioned"] == \
            case.startswith("zero3"), case
