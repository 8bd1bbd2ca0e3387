"""mixpo's trainer speaks Hugging Face: checkpoints exported to a from_pretrained directory,
TensorBoard logging, an eval split with eval/* metrics, a log line per logging step, --split
for saved DatasetDicts, HF schedule names."""
import json

import pytest
import torch

from fixtures import save_tiny_model, tiny_train_config, ultrafeedback_rows
from mixpo.cli import main
from mixpo.train.config import TrainConfig, build_config
from mixpo.train.metrics import read_metrics
from mixpo.train.optim import learning_rate_at
from mixpo.train.trainer import train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    rows = ultrafeedback_rows(24)
    save_tiny_model(root / "model", rows)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows[:16]))
    held_out = root / "eval.jsonl"
    held_out.write_text("".join(json.dumps(row) + "\n" for row in rows[16:]))
    return root, data, held_out


def config(tiny, out, **overrides):
    root, data, _ = tiny
    return tiny_train_config((root, data), out, **{"save_steps": 2, **overrides})


def test_export_checkpoint_tensorboard_eval_and_log_lines(tiny, tmp_path, capsys):
    _, _, held_out = tiny
    out = tmp_path / "run"
    train(config(tiny, out, report_to="tensorboard", eval_file=str(held_out), eval_steps=2))
    printed = capsys.readouterr().out
    assert "step 2/4 | loss" in printed and "learning_rate" in printed
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert {"eval/loss", "eval/rewards/accuracies", "eval/logps/chosen"} <= set(rows[1])
    assert "eval/loss" not in rows[0] and "eval/loss" in rows[3]
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)        # policy == reference
    assert list((out / "runs").glob("events.out.tfevents.*"))

    from transformers import AutoModelForCausalLM
    assert main(["export", str(out / "checkpoint-4"), "-o", str(tmp_path / "exported")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    for (name, a), (_, b) in zip(exported.state_dict().items(), final.state_dict().items()):
        assert torch.equal(a, b), name
    assert main(["export", str(out / "checkpoint-2"), "-o", str(tmp_path / "at2")]) == 0
    at2 = AutoModelForCausalLM.from_pretrained(tmp_path / "at2")
    assert any(not torch.equal(a, b) for a, b in zip(at2.parameters(), final.parameters()))
    assert main(["export", str(tmp_path / "nope"), "-o", str(tmp_path / "x")]) == 2


def test_flash_attention_2_without_flash_attn_trains_with_sdpa(tiny, tmp_path):
    import importlib.util
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn can run here")
    with pytest.warns(UserWarning, match=r"^attn_implementation flash_attention_2: .*; using "
                                         r"sdpa instead$"):
        result = train(config(tiny, tmp_path / "run", attn_implementation="flash_attention_2",
                              max_steps=1, save_steps=0))
    assert result["completed_steps"] == 1


def test_a_truncated_model_file_is_a_one_line_error_naming_it(tiny, tmp_path, capsys):
    import shutil
    root, data, _ = tiny
    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    weights = model / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    recipe = tmp_path / "empty.yaml"
    recipe.write_text("")
    argv = ["train", str(recipe), "--model_name_or_path", str(model), "--train_file", str(data),
            "--max_length", "48", "--output_dir", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mixpo train: error: cannot load a causal LM from '{model}': "
                          f"{weights} is truncated or damaged (") and err.count("\n") == 1


def test_split_of_a_saved_dataset_dict(tiny, tmp_path):
    import datasets
    _, data, held_out = tiny
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    saved = tmp_path / "dataset"
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows),
                          "test_prefs": datasets.Dataset.from_list(rows[:4])}).save_to_disk(
        str(saved))
    with pytest.raises(ValueError, match="choose one with --split"):
        train(config(tiny, tmp_path / "a", train_file=str(saved)))
    result = train(config(tiny, tmp_path / "b", train_file=str(saved), split="train_prefs",
                          max_steps=2, save_steps=0))
    assert result["completed_steps"] == 2


@pytest.mark.parametrize("schedule,expected", [
    ("linear", [0.0, 0.5, 1.0, 0.75, 0.5, 0.25]), ("constant", [1.0] * 6),
    ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0])])
def test_schedules_match_hugging_face(schedule, expected):
    from transformers import get_scheduler
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    reference = get_scheduler(schedule, optimizer, num_warmup_steps=2, num_training_steps=6)
    ours = []
    for step in range(6):
        ours.append(learning_rate_at(schedule, step, 6, 2, 1.0))
        assert ours[-1] == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12)
        optimizer.step()
        reference.step()
    assert ours == pytest.approx(expected)


def test_tensorboard_uses_hf_tags_and_a_resume_leaves_no_duplicate_points(tiny, tmp_path):
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = tmp_path / "run"
    train(config(tiny, out, report_to="tensorboard"))
    shutil.rmtree(out / "checkpoint-4")             # killed after logging step 4, before saving
    shutil.rmtree(out / "final")
    train(config(tiny, out, report_to="tensorboard"))   # resumes from checkpoint-2
    files = sorted((out / "runs").glob("events.out.tfevents.*"))
    assert len(files) == 2
    events = list(EventFileLoader(str(files[1])).Load())
    starts = [event.step for event in events if event.HasField("session_log")]
    assert starts == [3]        # TensorBoard drops the first run's points from step 3 on
    accumulator = EventAccumulator(str(out / "runs"))
    accumulator.Reload()
    assert {"train/loss", "train/rewards/margins", "train/learning_rate"} <= \
        set(accumulator.Tags()["scalars"])
    assert [event.step for event in accumulator.Scalars("train/loss")] == [1, 2, 3, 4]


def test_report_to_wandb_without_a_login_is_refused_before_anything_loads(tiny, tmp_path,
                                                                           monkeypatch):
    import sys

    package = tmp_path / "site" / "wandb"        # find_spec must find a wandb package
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('not for this test')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("HOME", str(tmp_path))   # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    sys.modules.pop("wandb", None)
    with pytest.raises(ValueError, match="no W&B login found .*WANDB_MODE=offline"):
        config(tiny, tmp_path / "x", report_to="wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert config(tiny, tmp_path / "x", report_to="wandb").report_to == ["wandb"]
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / ".netrc").write_text("machine api.wandb.ai login user password secret\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert config(tiny, tmp_path / "x", report_to="wandb").report_to == ["wandb"]


def test_conversational_rows_without_a_chat_template_are_refused(tmp_path):
    rows = ultrafeedback_rows(4)
    save_tiny_model(tmp_path / "model", rows)
    tokenizer_config = tmp_path / "model" / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text())
    settings.pop("chat_template", None)
    tokenizer_config.write_text(json.dumps(settings))
    for extra in ("chat_template.jinja", "chat_template.json"):
        (tmp_path / "model" / extra).unlink(missing_ok=True)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = build_config(TrainConfig, None, dict(
        model_name_or_path=str(tmp_path / "model"), train_file=str(data), max_length=48,
        global_batch_size=2, progress_bar=False, max_steps=1, output_dir=str(tmp_path / "o")))
    with pytest.raises(ValueError, match=r"train.jsonl line 1: conversational rows need a "
                                         "tokenizer with a chat template"):
        train(cfg)
