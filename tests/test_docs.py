"""The README says what the code does: its loss table is LOSS_TYPES, its recipe table names
every recipe, its test command is the one CI runs, and the options it names exist."""
import re
from pathlib import Path

from mixpo.loss_spec import LOSS_TYPES
from mixpo.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_loss_table_is_the_loss_spec():
    rows = [line for line in README.splitlines() if re.match(r"\| `[a-z_]+` \| `", line)]
    expected = [f"| `{spec.name}` | `{spec.formula}` | {spec.source} |"
                for spec in LOSS_TYPES.values()]
    assert rows == expected


def test_every_recipe_is_in_the_recipe_table():
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        assert f"recipes/{recipe.name}" in README, recipe.name


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)
    test_command = next(command for command in commands if "pytest" in command)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_train_options_named_in_the_readme_exist():
    """Every `--option` on a line that runs `mixpo train` (hyphenated ones belong to
    `mixpo data`) is a TrainConfig field."""
    fields = set(TrainConfig.__dataclass_fields__)
    named = set()
    for line in README.splitlines():
        if "mixpo train" in line:   # what follows it (torchrun's options come before)
            tail = line[line.index("mixpo train"):]
            named |= set(re.findall(r"(?<![\w-])--([a-z_0-9]+)(?![\w-])", tail)) - {"help"}
    assert len(named) > 10 and named <= fields, sorted(named - fields)


def test_the_data_api_snippet_runs(tmp_path, monkeypatch):
    """The README's "same steps from Python" block runs as written on real-format files."""
    import datasets

    from fixtures import (build_tiny_tokenizer, corpus_texts, raw_completion_rows,
                          ultrafeedback_rows, write_jsonl)

    blocks = re.findall(r"```python\n(.*?)\n```", README, re.S)
    snippet = next(block for block in blocks if "from mixpo.data.io import" in block)
    monkeypatch.chdir(tmp_path)
    write_jsonl("raw_completions.jsonl", raw_completion_rows())
    rows = ultrafeedback_rows(8)
    datasets.Dataset.from_list(rows).to_parquet("ultrafeedback.parquet")
    scope = {"tokenizer": build_tiny_tokenizer(corpus_texts(rows))}
    exec(snippet, scope)
    assert len(scope["examples"]) == 8 and scope["report"].rows == 8
    assert len(datasets.Dataset.from_parquet("prepared.parquet")) == 8
    assert len(scope["pairs"]) > 0
