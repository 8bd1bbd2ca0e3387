"""Recipes, YAML + command-line overrides, and config errors."""
from pathlib import Path

import pytest

from mixpo.cli import build_parser, main
from mixpo.train.config import TrainConfig, build_config, overrides_from_args
from mixpo.train.demo import DemoConfig

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_every_recipe_parses_and_keeps_its_paper_settings():
    configs = {path.stem: build_config(TrainConfig, path) for path in RECIPES}
    assert set(configs) == {
        "dpo-qwen2.5-7b", "mixdpo-llama3-8b-base", "mixdpo-mistral-7b-base",
        "mixdpo-qwen2.5-7b-base", "mixdpo-ipo-llama3-8b-base", "mixdpo-argilla-llama3-8b-base",
        "mixdpo-llama3-8b-instruct", "mixdpo-embedding-llama3-8b-base",
        "mixdpo-reward-llama3-8b-base", "selective-dpo-llama3-8b-base",
        "gamma-simpo-llama3-8b-instruct", "gamma-dpo-llama3-8b-instruct", "simpo-llama3-8b-base"}
    settings = ("beta", "label_smoothing", "learning_rate", "route_below", "route_at_or_below",
                "route_fraction", "difficulty", "order", "num_train_epochs")
    expected = {  # the papers' / authors' numbers each recipe cites
        "mixdpo-llama3-8b-base": (0.01, 0.1, 1e-6, 0.5, None, None, "rating", "easy-first", 1),
        "mixdpo-mistral-7b-base": (0.01, 0.1, 2e-7, 0.5, None, None, "rating", "easy-first", 1),
        "mixdpo-qwen2.5-7b-base": (0.01, 0.0, 8e-7, 0.5, None, None, "rating", "easy-first", 1),
        "mixdpo-ipo-llama3-8b-base": (0.01, 0.0, 1e-6, 0.5, None, None, "rating", "easy-first",
                                      1),
        "mixdpo-argilla-llama3-8b-base": (0.05, 0.0, 5e-7, None, 0.5, None, "rating",
                                          "easy-first", 2),
        "mixdpo-llama3-8b-instruct": (0.01, 0.0, 1e-6, -0.5, None, None, "rating",
                                      "easy-first", 1),
        "mixdpo-embedding-llama3-8b-base": (0.01, 0.1, 1e-7, None, None, 0.1, "embedding",
                                            "easy-first", 1),
        "mixdpo-reward-llama3-8b-base": (0.01, 0.0, 1e-7, None, None, 0.1, "reward",
                                         "easy-first", 1),
        "dpo-qwen2.5-7b": (0.01, 0.0, 8e-7, None, None, None, "rating", "shuffle", 1),
    }
    for name, values in expected.items():
        assert tuple(getattr(configs[name], key) for key in settings) == values, name
    ipo = configs["mixdpo-ipo-llama3-8b-base"]
    assert ipo.loss_type == ["ipo"] and ipo.average_log_prob is False      # summed, ipo-sft
    selective = configs["selective-dpo-llama3-8b-base"]
    assert (selective.select_easiest, selective.beta, selective.difficulty) == \
        (0.5, 0.01, "validation-loss")
    gamma_simpo = configs["gamma-simpo-llama3-8b-instruct"]
    assert (gamma_simpo.loss_type, gamma_simpo.beta, gamma_simpo.gamma, gamma_simpo.margin_tau,
            gamma_simpo.adaptive_margin) == (["simpo"], 10.0, 4.0, 10.0, True)
    gamma_dpo = configs["gamma-dpo-llama3-8b-instruct"]
    # No published gamma-DPO settings: beta from Table 6's DPO range, ratio and tau Table 7.
    assert gamma_dpo.margin_center and gamma_dpo.average_log_prob is False
    assert gamma_dpo.beta in (0.01, 0.05, 0.1) and gamma_dpo.gamma == pytest.approx(
        0.4 * gamma_dpo.beta)
    assert "NO PUBLISHED SETTINGS" in (RECIPES[0].parent / "gamma-dpo-llama3-8b-instruct.yaml"
                                       ).read_text()
    assert configs["simpo-llama3-8b-base"].reference_free
    for name, config in configs.items():
        # The papers' optimizer: fp32 master weights and fp32 AdamW states, bf16 compute.
        assert (config.mixed_precision, config.optim) == ("bf16", "adamw"), name
        assert config.global_batch_size == 128, name
    for path in RECIPES:
        text = path.read_text()
        assert "Source" in text, f"{path.name} does not cite its source"
        assert "micro_batch_size" not in text and "num_epochs" not in text, \
            f"{path.name} uses the old option names"


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
