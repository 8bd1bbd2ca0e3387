"""Every recipe runs: `mixpo train recipes/X.yaml` on a tiny model and a small file in the
format the recipe's data has (UltraFeedback ratings, Argilla ratings, instruct ratings with
negative margins, embedding distances, reward margins, validation losses), one optimizer
step, with the recipe's own loss, routing, order and precision; the routed count is checked
against the recipe's rule computed here."""
import random
from pathlib import Path

import pytest
import torch

from fixtures import argilla_rows, save_tiny_model, ultrafeedback_rows, write_jsonl
from mixpo.cli import main
from mixpo.train.config import TrainConfig, build_config
from mixpo.train.metrics import read_metrics

RECIPES = Path(__file__).parent.parent / "recipes"


pytestmark = pytest.mark.usefixtures("one_thread")


def instruct_rows():
    """Integer 1-10 ratings of RM-picked pairs: some chosen responses rated worse."""
    rows = ultrafeedback_rows(16, seed=3)
    rng = random.Random(3)
    for row in rows:
        row["score_chosen"] = float(rng.randint(1, 10))
        row["score_rejected"] = float(rng.randint(1, 10))
    return rows


def with_column(rows, **columns):
    rng = random.Random(4)
    for row in rows:
        for name, (low, high) in columns.items():
            row[name] = rng.uniform(low, high)
    return rows


def rating_margins(rows, chosen="score_chosen", rejected="score_rejected"):
    return [row[chosen] - row[rejected] for row in rows]


# recipe -> (rows, expected number of routed pairs or None = the recipe does not route)
CASES = {
    "mixdpo-llama3-8b-base": lambda: (rows := ultrafeedback_rows(16),
                                      sum(m < 0.5 for m in rating_margins(rows))),
    "mixdpo-mistral-7b-base": lambda: (rows := ultrafeedback_rows(16),
                                       sum(m < 0.5 for m in rating_margins(rows))),
    "mixdpo-qwen2.5-7b-base": lambda: (rows := ultrafeedback_rows(16),
                                       sum(m < 0.5 for m in rating_margins(rows))),
    "mixdpo-ipo-llama3-8b-base": lambda: (rows := ultrafeedback_rows(16),
                                          sum(m < 0.5 for m in rating_margins(rows))),
    "mixdpo-argilla-llama3-8b-base": lambda: (
        rows := argilla_rows(16),
        sum(m <= 0.5 for m in rating_margins(rows, "chosen_rating", "rejected_rating"))),
    "mixdpo-llama3-8b-instruct": lambda: (rows := instruct_rows(),
                                          sum(m < -0.5 for m in rating_margins(rows))),
    "mixdpo-embedding-llama3-8b-base": lambda: (
        with_column(ultrafeedback_rows(20), embedding_distance=(0.1, 0.9)), 2),
    "mixdpo-reward-llama3-8b-base": lambda: (
        with_column(ultrafeedback_rows(20), reward_chosen=(-3, 3), reward_rejected=(-3, 3)), 2),
    "selective-dpo-llama3-8b-base": lambda: (
        with_column(ultrafeedback_rows(16), validation_loss=(0.3, 1.2)), None),
    "dpo-qwen2.5-7b": lambda: (ultrafeedback_rows(16), None),
    "simpo-llama3-8b-base": lambda: (ultrafeedback_rows(16), None),
    "gamma-simpo-llama3-8b-instruct": lambda: (ultrafeedback_rows(16), None),
    "gamma-dpo-llama3-8b-instruct": lambda: (ultrafeedback_rows(16), None),
}


def test_every_recipe_has_a_case():
    assert {path.stem for path in RECIPES.glob("*.yaml")} == set(CASES)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    rows = ultrafeedback_rows(24) + argilla_rows(16) + instruct_rows()
    return save_tiny_model(tmp_path_factory.mktemp("recipes") / "model", rows)


@pytest.mark.parametrize("name", sorted(CASES))
def test_recipe_trains_one_step(name, model_dir, tmp_path, capsys):
    rows, routed = CASES[name]()
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = RECIPES / f"{name}.yaml"
    out = tmp_path / "run"
    overrides = ["--model_name_or_path", str(model_dir), "--train_file", str(data),
                 "--output_dir", str(out), "--max_steps", "1", "--global_batch_size", "4",
                 "--per_device_train_batch_size", "2", "--max_length", "48",
                 "--max_prompt_length", "16", "--save_steps", "0", "--progress_bar", "false"]
    assert main(["train", str(recipe), *overrides]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    metrics = read_metrics(out)
    assert len(metrics) == 1 and torch.isfinite(torch.tensor(metrics[0]["loss"]))
    assert (out / "final" / "config.json").exists()
    config = build_config(TrainConfig, recipe)
    if routed is None:
        assert "routing:" not in printed
    else:
        assert f"routing: {routed} of " in printed, printed
    if config.select_easiest is not None:
        kept = int(config.select_easiest * len(rows))
        assert f"{len(rows)} rows in, {kept} out" in printed, printed


def test_shuffle_without_a_difficulty_permutes_the_file(model_dir, tmp_path):
    """SimPO / gamma-PO recipes have no difficulty: `order: shuffle` is a seeded permutation
    of the file (the authors' random sampler), any other order keeps the file's."""
    from types import SimpleNamespace

    from mixpo.hf.loading import load_tokenizer
    from mixpo.train.trainer import load_examples

    rows = ultrafeedback_rows(16)
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    tokenizer = load_tokenizer(str(model_dir))
    env = SimpleNamespace(is_main=True)

    def order(**options):
        config = build_config(TrainConfig, None, dict(
            model_name_or_path=str(model_dir), train_file=str(data), max_length=48,
            max_prompt_length=16, **options))
        examples = load_examples(config, tokenizer, env, str(data))
        return [tuple(example["chosen_input_ids"]) for example in examples]

    file_order = order()
    shuffled = order(order="shuffle")
    assert sorted(shuffled) == sorted(file_order) and shuffled != file_order
    assert order(order="shuffle") == shuffled                      # seeded
    assert order(order="shuffle", seed=7) != shuffled
    assert order(order="as-is") == file_order


def test_score_columns_name_the_rating_columns(model_dir, tmp_path):
    from types import SimpleNamespace

    from mixpo.hf.loading import load_tokenizer
    from mixpo.train.trainer import load_examples

    rows = instruct_rows()
    margins = rating_margins(rows)
    for row in rows:
        row["gpt_chosen"], row["gpt_rejected"] = row.pop("score_chosen"), row.pop("score_rejected")
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    values = dict(model_name_or_path=str(model_dir), train_file=str(data), max_length=48,
                  max_prompt_length=16, difficulty="rating", route_below=-0.5,
                  score_columns=["gpt_chosen", "gpt_rejected"])
    config = build_config(TrainConfig, None, values)
    examples = load_examples(config, load_tokenizer(str(model_dir)),
                             SimpleNamespace(is_main=True), str(data))
    assert sum(example["hard"] for example in examples) == sum(m < -0.5 for m in margins) > 0
    with pytest.raises(ValueError, match="no rating columns"):
        load_examples(build_config(TrainConfig, None, {**values, "score_columns": None}),
                      load_tokenizer(str(model_dir)), SimpleNamespace(is_main=True), str(data))
    with pytest.raises(ValueError, match="score_columns names two rating columns"):
        build_config(TrainConfig, None, {**values, "difficulty": "reward"})


def _plan_output(command: str) -> str:
    """`mixpo plan ...` as the recipe headers quote it, run through the CLI's parser."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(command.split()[1:]) == 0
    return out.getvalue()


def test_recipe_headers_quote_what_mixpo_plan_prints():
    """Every memory figure in a recipe's header comes from the `mixpo plan` command quoted
    right after it, run on the recipe's own sequence length and micro-batch: they cannot
    drift from the planner."""
    import re

    outputs, checked = {}, 0
    for path in sorted(RECIPES.glob("*.yaml")):
        config = build_config(TrainConfig, str(path), {})
        pending = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                continue
            command = re.match(r"#\s+(mixpo plan .*)$", line)
            if command:
                command = command.group(1).strip()
                arguments = command.split()
                assert arguments[arguments.index("--micro-batch-size") + 1] == \
                    str(config.per_device_train_batch_size), (path.name, command)
                seq_len = arguments[arguments.index("--seq-len") + 1] \
                    if "--seq-len" in arguments else "1024"
                assert seq_len == str(config.max_length), (path.name, command)
                output = outputs.setdefault(command, _plan_output(command))
                assert pending, f"{path.name}: no figure before {command}"
                for figure in pending:
                    assert f"{figure} GiB" in output, (path.name, figure, command)
                    checked += 1
                pending = []
            else:
                pending += re.findall(r"(\d+\.\d+) GiB", line)
        assert not pending, f"{path.name}: {pending} GiB quoted without a command after them"
    assert checked >= 2 * 12
