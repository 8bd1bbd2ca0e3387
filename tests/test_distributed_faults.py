"""Two processes under torchrun (gloo on CPU): `mixpo demo` writes from rank 0 only and
reports once; a stopped rank turns into a one-line collective-timeout error on its peer
instead of a hang."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures import save_tiny_model, ultrafeedback_rows

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "-m", "mixpo"]


def cli_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_demo_under_torchrun_writes_once_and_reruns(tmp_path):
    out = tmp_path / "demo"
    command = TORCHRUN + ["demo", "--output_dir", str(out), "--operand_max", "6",
                          "--sft_steps", "10", "--max_steps", "4", "--save_steps", "2",
                          "--logging_steps", "2", "--progress_bar", "false"]
    first = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=400)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("task accuracy (greedy decoding, all sums)") == 1   # rank 0 only
    results = json.loads((out / "demo_results.json").read_text())
    assert (out / "sft-model" / "config.json").is_file() and (out / "final").is_dir()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert [json.loads(line)["step"] for line in
            (out / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    # The rerun: every rank reads what rank 0 wrote, nothing is redone.
    second = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("reusing the SFT warm-up") == 1
    assert json.loads((out / "demo_results.json").read_text()) == results


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (a child of `parent`)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            parent_pid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent_pid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_stopped_rank_becomes_a_timeout_error_not_a_hang(tmp_path):
    rows = ultrafeedback_rows(32)
    save_tiny_model(tmp_path / "model", rows)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: {tmp_path / 'model'}\ntrain_file: {data}\n"
                      "max_length: 48\nmax_prompt_length: 16\nglobal_batch_size: 8\n"
                      "per_device_train_batch_size: 2\nlogging_steps: 1\nmax_steps: 1000\n"
                      "save_steps: 0\nprogress_bar: false\nddp_timeout: 10\n")
    command = TORCHRUN + ["train", str(recipe), "--output_dir", str(out)]
    process = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    stopped = None
    try:
        deadline = time.time() + 240
        metrics = out / "metrics.jsonl"
        while time.time() < deadline and process.poll() is None and not (
                metrics.exists() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.2)
        assert process.poll() is None, process.stderr.read()[-3000:]
        stopped = _rank_pid(process.pid, 1)
        assert stopped is not None
        os.kill(stopped, signal.SIGSTOP)
        started = time.time()
        _, stderr = process.communicate(timeout=200)
        waited = time.time() - started
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert ("mixpo train: error: rank 0: a collective waited longer than ddp_timeout = 10 s "
            "for another rank") in stderr, stderr[-3000:]
    # 10 s timeout + torchrun's 30 s SIGTERM grace for the stopped rank, well short of a hang.
    assert waited < 150
    assert not (out / "final").exists()
