"""Recipes, YAML + command-line overrides, and config errors."""
from pathlib import Path

import pytest

from mixpo.cli import build_parser, main
from mixpo.train.config import TrainConfig, build_config, overrides_from_args
from mixpo.train.demo import DemoConfig

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_every_recipe_parses_and_keeps_its_paper_settings():
    configs = {path.stem: build_config(TrainConfig, path) for path in RECIPES}
    assert set(configs) == {"dpo-qwen2.5-7b", "mixdpo-llama3-8b-base",
                            "selective-dpo-llama3-8b-base", "gamma-simpo-llama3-8b-instruct",
                            "gamma-dpo-llama3-8b-instruct", "simpo-llama3-8b-base"}
    mixdpo = configs["mixdpo-llama3-8b-base"]
    assert (mixdpo.beta, mixdpo.label_smoothing, mixdpo.learning_rate, mixdpo.route_below,
            mixdpo.difficulty, mixdpo.order) == (0.01, 0.1, 1e-6, 0.5, "rating", "easy-first")
    selective = configs["selective-dpo-llama3-8b-base"]
    assert (selective.select_easiest, selective.beta, selective.difficulty) == \
        (0.5, 0.01, "validation-loss")
    gamma_simpo = configs["gamma-simpo-llama3-8b-instruct"]
    assert (gamma_simpo.loss_type, gamma_simpo.beta, gamma_simpo.gamma, gamma_simpo.margin_tau,
            gamma_simpo.adaptive_margin) == (["simpo"], 10.0, 4.0, 10.0, True)
    gamma_dpo = configs["gamma-dpo-llama3-8b-instruct"]
    assert gamma_dpo.margin_center and gamma_dpo.average_log_prob
    assert configs["simpo-llama3-8b-base"].reference_free
    for path in RECIPES:
        assert "Source:" in path.read_text(), f"{path.name} does not cite its source"


def parse(*argv):
    args = build_parser().parse_args(["train", str(RECIPES[0]), *argv])
    return build_config(TrainConfig, args.config, overrides_from_args(args, TrainConfig))


def test_command_line_overrides_are_typed():
    config = parse("--max_steps", "12", "--save-steps", "4", "--logging_steps=1",
                   "--output_dir", "runs/x", "--gradient_checkpointing", "false",
                   "--route_below", "none", "--learning_rate", "3e-7", "--routing")
    assert (config.max_steps, config.save_steps, config.logging_steps) == (12, 4, 1)
    assert config.output_dir == "runs/x" and config.gradient_checkpointing is False
    assert config.route_below is None and config.learning_rate == 3e-7 and config.routing
    assert config.beta == 0.01  # untouched recipe value


def test_unknown_and_malformed_keys_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "r.yaml", "--max_stepz", "3"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --max_stepz" in capsys.readouterr().err
    with pytest.raises(ValueError, match="config key 'max_steps': cannot read 'many' as int"):
        parse("--max_steps", "many")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("beta: 0.1\nlearning_rat: 1e-6\n")
    with pytest.raises(ValueError, match=r"unknown config key 'learning_rat' in .*bad.yaml; "
                                         r"did you mean learning_rate"):
        build_config(TrainConfig, recipe)
    assert main(["train", str(recipe)]) == 2
    assert "unknown config key 'learning_rat'" in capsys.readouterr().err


def test_inconsistent_options_are_refused():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        build_config(TrainConfig, overrides={"loss_type": "kto"})
    with pytest.raises(ValueError, match="set max_grad_norm 0"):
        build_config(TrainConfig, overrides={"step_in_backward": "true"})
    with pytest.raises(ValueError, match="need a difficulty"):
        build_config(TrainConfig, overrides={"select_easiest": 0.5})
    with pytest.raises(ValueError, match="the demo builds its own model"):
        build_config(DemoConfig, overrides={"train_file": "x.jsonl"})
    assert build_config(DemoConfig, overrides={"max_steps": "3"}).max_steps == 3
