"""The trainer under faults and bad input: divergence stops the run and nothing non-finite is
saved, nonsense options fail before any model is loaded, one run per output directory, damaged
state falls back, changed data is not resumed onto, and a training step makes no host sync."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from fixtures import tiny_train_config, tiny_training_setup
from mixpo.cli import main
from mixpo.train import checkpoint
from mixpo.train.config import TrainConfig, build_config
from mixpo.train.metrics import read_metrics
from mixpo.train.trainer import Diverged, train

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_training_setup(tmp_path_factory.mktemp("faults"))


def config(tiny, out, **overrides):
    return tiny_train_config(tiny, out, **overrides)


def test_divergence_stops_the_run_and_saves_nothing_non_finite(tiny, tmp_path):
    out = tmp_path / "diverged"
    cfg = config(tiny, out, learning_rate=1e6, warmup_ratio=0.0, save_steps=1)
    with pytest.raises(Diverged, match=r"diverged at step 2 \(learning_rate .*\).*resumes "
                                       r"from checkpoint-1"):
        train(cfg)
    assert [step for step, _ in checkpoint.complete_checkpoints(out)] == [1]
    assert not (out / "final").exists()
    assert [row["step"] for row in read_metrics(out)] == [1]
    # The kept checkpoint is finite, and a rerun resumes from it (and diverges the same way).
    with pytest.raises(Diverged, match="diverged at step 2"):
        train(cfg)
    # On the command line: one line, exit code 2.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("".join(f"{k}: {v}\n" for k, v in cfg.to_dict().items()
                              if not isinstance(v, list) and v is not None
                              and k != "output_dir"))
    argv = ["train", str(recipe), "--output_dir", str(tmp_path / "cli"), "--learning_rate", "1e8"]
    assert main(argv) == 2


@pytest.mark.parametrize("override,match", [
    (dict(max_grad_norm=-1), "max_grad_norm must be >= 0"),
    (dict(save_steps=-1), "save_steps must be >= 0"),
    (dict(max_steps=-1), "max_steps must be >= 0"),
    (dict(save_total_limit=-1), "save_total_limit must be >= 0"),
    (dict(loss_type="simpo", reference="live"), "is reference-free"),
    (dict(learning_rate=-1e-6), "learning_rate must be > 0"),
    (dict(weight_decay=-1), "weight_decay must be >= 0"),
    (dict(adam_beta1=2), "adam_beta1 must be in"),
    (dict(margin_tau=0), "margin_tau must be > 0"),
    (dict(sft_weight=-1), "sft_weight must be"),
    (dict(gamma="nan"), "not a finite number"),
    (dict(beta=0), "beta must be"),
    (dict(lr_scheduler_type="exp"), "lr_scheduler_type must be one of"),
    (dict(report_to="mlflow"), "report_to must list"),
    (dict(route_below=0.5), "need a difficulty"),
    (dict(route_below=0.5, route_at_or_below=0.5, difficulty="rating"), "choose one of"),
    (dict(max_length=1), "max_length must be >= 2"),
    (dict(score_columns=["a", "b"], difficulty="reward"), "score_columns names two"),
])
def test_nonsense_options_are_refused_before_anything_loads(tiny, tmp_path, override, match):
    root, data = tiny
    values = dict(model_name_or_path=str(root / "missing-model"), train_file=str(data),
                  output_dir=str(tmp_path / "x"))
    with pytest.raises(ValueError, match=match):
        build_config(TrainConfig, None, {**values, **override})
    assert not (tmp_path / "x").exists()


def test_adamw_8bit_without_torchao_is_refused_early(tiny, tmp_path, monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",        # as if torchao were not installed
                        lambda name, *args: None if name == "torchao" else find_spec(name, *args))
    with pytest.raises(ValueError, match="needs torchao"):
        config(tiny, tmp_path, optim="adamw_8bit")


def test_missing_data_fails_first_with_how_to_produce_it(tiny, tmp_path, capsys):
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("")
    argv = ["train", str(recipe), "--model_name_or_path", "princeton-nlp/not-downloaded",
            "--train_file", str(tmp_path / "data/ultrafeedback.parquet"),
            "--output_dir", str(tmp_path / "o")]
    started = time.perf_counter()
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "train_file" in error and "mixpo data prepare" in error
    assert time.perf_counter() - started < 10          # no hub retries before the data check


def test_old_key_names_still_work(tiny, tmp_path):
    with pytest.warns(FutureWarning, match="'micro_batch_size' is now "
                                           "'per_device_train_batch_size'"):
        cfg = config(tiny, tmp_path, micro_batch_size=4, num_epochs=2, bf16="false")
    # Hugging Face's bf16 switch is mixed precision (fp32 master weights, bf16 compute).
    assert (cfg.per_device_train_batch_size, cfg.num_train_epochs, cfg.mixed_precision) == \
        (4, 2, "no")
    assert config(tiny, tmp_path, bf16=True).mixed_precision == "bf16"
    previous = {"config": {**cfg.to_dict(), "micro_batch_size": 4}, "completed_steps": None}
    del previous["config"]["per_device_train_batch_size"]
    checkpoint.check_same_run(previous, cfg.to_dict(), tmp_path)    # same run, old names


def test_one_run_per_output_directory(tiny, tmp_path):
    out = tmp_path / "locked"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from pathlib import Path; from mixpo.train.checkpoint import "
         "output_lock\nwith output_lock(Path(sys.argv[1])):\n print('held', flush=True)\n "
         "time.sleep(120)", str(out)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=r"in use by another mixpo run \(pid "):
            train(config(tiny, out))
        holder.send_signal(signal.SIGKILL)                  # a killed run leaves no stuck lock
        holder.wait(timeout=30)
        with checkpoint.output_lock(out):
            pass
    finally:
        holder.kill()


def test_damaged_state_falls_back_and_caches_are_recomputed(tiny, tmp_path):
    out = tmp_path / "damaged"
    train(config(tiny, out, save_steps=2, max_steps=4))
    full = read_metrics(out)
    # Lose the final export (as if killed before it) and damage the newest checkpoint.
    import shutil
    shutil.rmtree(out / "final")
    shard = next((out / "checkpoint-4" / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    (out / "reference_logps.pt").write_bytes(b"truncated")
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "lo')                   # a torn last line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(config(tiny, out, save_steps=2, max_steps=4))
    messages = " | ".join(str(w.message) for w in caught)
    assert "skipping checkpoint-4" in messages and shard.name in messages
    assert "reference_logps.pt is damaged" in messages and "torn last line" in messages
    again = read_metrics(out)
    assert [row["step"] for row in again] == [1, 2, 3, 4]
    assert again[3]["loss"] == pytest.approx(full[3]["loss"], rel=1e-5)


def test_every_checkpoint_damaged_is_a_one_line_error(tiny, tmp_path):
    out = tmp_path / "all-damaged"
    train(config(tiny, out, save_steps=2, max_steps=4))
    import shutil
    shutil.rmtree(out / "final")
    for path in out.glob("checkpoint-*"):
        (path / "trainer_state.pt").write_bytes(b"x")
    with pytest.warns(UserWarning):
        with pytest.raises(ValueError, match="every checkpoint in .* is damaged"):
            train(config(tiny, out, save_steps=2, max_steps=4))


def test_changed_data_is_not_resumed_onto(tiny, tmp_path):
    root, data = tiny
    swapped = tmp_path / "swapped.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for row in rows:
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    out = tmp_path / "run"
    train(config(tiny, out, save_steps=2, max_steps=4))
    swapped.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data_backup = data.read_text()
    try:
        data.write_text(swapped.read_text())        # the same path, other pairs
        with pytest.raises(ValueError, match="other training data or another model"):
            train(config(tiny, out, save_steps=2, max_steps=4))
        train(config(tiny, out, save_steps=2, max_steps=6, resume_on_changed_data=True))
    finally:
        data.write_text(data_backup)


def test_routing_column_values_are_type_checked(tiny, tmp_path):
    root, data = tiny
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for row in rows:
        row["hard"] = "false"
    prepared = tmp_path / "prepared.jsonl"
    prepared.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=r"prepared.jsonl line 1, column 'hard': routing flags "
                                         r"must be true/false, got 'false'"):
        train(config(tiny, tmp_path / "o", train_file=str(prepared), routing=True))


SYNC_CALLS = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero", "cpu")
# Modules a training step runs on device tensors: none of them may read a value on the host.
STEP_MODULES = ("mixpo/losses.py", "mixpo/functions.py", "mixpo/checks.py", "mixpo/kernels/",
                "mixpo/margins.py", "mixpo/hf/policy.py", "mixpo/train/optim.py")


def count_step_syncs(tiny, out, max_steps, monkeypatch, **options):
    """Host-sync calls made from the step's modules during a whole run (one log at the end,
    no checkpoint): a per-step sync makes the count grow with max_steps."""
    import inspect
    calls = []

    def recorder(name, original):
        def wrapped(self, *args, **kwargs):
            for frame in inspect.stack(context=0)[1:6]:
                path = frame.filename.replace(os.sep, "/")
                if "/mixpo/" in path:
                    if any(module in path for module in STEP_MODULES):
                        calls.append(f"{path.split('/mixpo/')[-1]}:{frame.lineno} {name}")
                    break
            return original(self, *args, **kwargs)
        return wrapped

    for name in SYNC_CALLS:
        monkeypatch.setattr(torch.Tensor, name, recorder(name, getattr(torch.Tensor, name)))
    train(config(tiny, out, max_steps=max_steps, logging_steps=max_steps, adaptive_margin=True,
                 gamma=0.5, difficulty="rating", route_below=1.0, **options))
    monkeypatch.undo()
    return calls


@pytest.mark.parametrize("padding_free", [False, True])
def test_no_host_sync_per_training_step(tiny, tmp_path, monkeypatch, padding_free):
    short = count_step_syncs(tiny, tmp_path / "short", 2, monkeypatch, padding_free=padding_free)
    long = count_step_syncs(tiny, tmp_path / "long", 6, monkeypatch, padding_free=padding_free)
    assert len(long) == len(short), sorted(set(long) - set(short))[:10]
    # The checker sees syncs: the loss API's checks (validate=True) do read values.
    import mixpo
    calls = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or [])
    mixpo.linear_preference_loss(torch.randn(2, 3, 4), torch.randn(5, 4),
                                 torch.ones(2, 3, dtype=torch.long), backend="torch")
    assert calls
