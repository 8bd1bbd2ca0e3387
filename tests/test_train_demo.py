"""`mixpo demo` end to end on a shortened run, and its task builders."""
import json
import random

import pytest

from mixpo.cli import main
from mixpo.train.demo import build_char_tokenizer, preference_rows, wrong_answers


def test_char_tokenizer_round_trips_and_wrong_answers_are_wrong():
    tokenizer = build_char_tokenizer()
    ids = tokenizer("12+7=19", add_special_tokens=False)["input_ids"]
    assert len(ids) == 7 and tokenizer.decode(ids) == "12+7=19" and len(tokenizer) == 14
    rng = random.Random(0)
    for answer in range(40):
        wrong = wrong_answers(answer, rng)
        assert all(text != str(answer) and int(text) >= 0 for text, _ in wrong)
        assert [score for _, score in wrong] == [9.5, 6.0, 2.0]
    rows = preference_rows([(3, 4)], seed=0)
    assert {row["chosen"] for row in rows} == {"7"} and len(rows) == 3


def test_demo_short_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--output_dir", str(out), "--operand_max", "6", "--sft_steps", "10",
            "--global_batch_size", "8", "--micro_batch_size", "4", "--max_steps", "4",
            "--save_steps", "2", "--logging_steps", "1", "--progress_bar", "false"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "task accuracy (greedy decoding, all sums)" in printed and "reward margin" in printed
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "demo_results.json").read_text())
    for phase in ("before", "after"):
        assert 0.0 <= results[phase]["task_accuracy"] <= 1.0
    assert "reward_accuracy" in results["after"] and results["hard_pairs"] == 36
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert (out / "checkpoint-4").is_dir() and (out / "final" / "model.safetensors").is_file()
    # A rerun reuses the warm-up and the finished training, and reports the same numbers.
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "reusing the SFT warm-up" in printed and "nothing to do" in printed
    assert json.loads((out / "demo_results.json").read_text()) == results


def test_demo_refuses_foreign_model_and_data(capsys):
    assert main(["demo", "--train_file", "mine.jsonl"]) == 2
    assert "the demo builds its own model and data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--sft_stepz", "3"])
