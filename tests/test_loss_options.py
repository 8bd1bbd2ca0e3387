"""One definition of the loss options (mixpo.LossConfig): every option means the same through
the four front ends (preference_loss, PreferenceLoss, linear_preference_loss,
LinearPreferenceLoss) and the two training configs (mixpo's TrainConfig, MixpoDPOConfig),
and the bugs of its copies stay fixed."""
import dataclasses

import pytest
import torch

import mixpo
from mixpo.loss_config import LOSS_OPTIONS, LossConfig, user_options

# One setting per option (with what it needs beside it); each moves the loss.
SETTINGS = {
    "loss_type": dict(loss_type="simpo", beta=2.0),
    "loss_weights": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    "beta": dict(beta=0.37),
    "gamma": dict(gamma=0.4),
    "label_smoothing": dict(label_smoothing=0.1),
    "average_log_prob": dict(average_log_prob=True),
    "sft_weight": dict(sft_weight=0.2),
    "nll_normalization": dict(sft_weight=0.2, nll_normalization="pair"),
    "cpo_alpha": dict(loss_type="cpo", cpo_alpha=0.3),
    "discopop_tau": dict(loss_type="discopop", beta=0.01, discopop_tau=0.5),
    "use_weighting": dict(use_weighting=True),
    "f_divergence_type": dict(f_divergence_type="js_divergence"),
    "f_alpha_divergence_coef": dict(f_divergence_type="alpha_divergence",
                                    f_alpha_divergence_coef=0.3),
    "ld_alpha": dict(ld_alpha=0.5),
    "rdpo_alpha": dict(rdpo_alpha=0.1),
    "dpop_lambda": dict(dpop_lambda=0.5),
    "logit_scale": dict(logit_scale=0.5),
    "softcap": dict(softcap=2.0),
    "token_metrics": dict(token_metrics=True),
    "ignore_index": dict(ignore_index=-1),
}


def batch(ignore_index=-100, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 7, 16, generator=gen)
    head = torch.nn.Linear(16, 50, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 16, generator=gen) * 0.2)
    labels = torch.randint(0, 50, (4, 7), generator=gen)
    labels[:, :2] = ignore_index
    labels[1, 5:] = ignore_index
    ref = -10 - torch.rand(4, generator=gen) * 2     # above the log-probs: u < 0
    return hidden, head, labels, ref


def four_losses(options):
    ignore_index = options.get("ignore_index", -100)
    hidden, head, labels, ref = batch(ignore_index)
    config = LossConfig(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in options.items()})
    ref = None if config.reference_free else ref
    logits = hidden @ head.weight.T
    losses = {
        "preference_loss": mixpo.preference_loss(logits, labels, ref_logps=ref, **options),
        "PreferenceLoss": mixpo.PreferenceLoss(**options)(logits, labels, ref_logps=ref),
        "linear_preference_loss": mixpo.linear_preference_loss(hidden, head.weight, labels,
                                                               ref_logps=ref, **options),
        "LinearPreferenceLoss": mixpo.LinearPreferenceLoss(**options)(hidden, head, labels,
                                                                      ref_logps=ref)}
    return {name: out.loss.detach() for name, out in losses.items()}


def test_every_option_is_covered():
    assert set(SETTINGS) == set(LOSS_OPTIONS)


@pytest.mark.parametrize("option", sorted(SETTINGS))
def test_every_option_means_the_same_in_the_four_front_ends(option):
    options = SETTINGS[option]
    losses = four_losses(options)
    first = losses["preference_loss"]
    for name, loss in losses.items():
        torch.testing.assert_close(loss, first, rtol=1e-5, atol=1e-6, msg=name)
    if option == "ignore_index":                  # -1 labels read as tokens without it
        hidden, head, labels, ref = batch(ignore_index=-1)
        with pytest.raises(ValueError, match="labels"):
            mixpo.linear_preference_loss(hidden, head.weight, labels, ref_logps=ref)
        return
    baseline = four_losses({k: v for k, v in options.items() if k != option})[
        "preference_loss"]                          # the option's default, the rest kept
    if option != "token_metrics":                 # metrics only: the loss stays
        assert not torch.allclose(first, baseline), option


@pytest.mark.parametrize("option", sorted(user_options()))
def test_training_configs_read_every_option_as_the_loss_does(option, tmp_path):
    from mixpo.train.config import TrainConfig, build_config

    options = SETTINGS[option]
    expected = LossConfig(**{k: tuple(v) if isinstance(v, list) else v
                             for k, v in options.items()})
    cfg = build_config(TrainConfig, None, {"model_name_or_path": "m", "train_file": "t",
                                           "output_dir": str(tmp_path), **options})
    assert cfg.loss_config() == expected
    if option == "token_metrics":                 # always on in the TRL integration
        return
    trl = pytest.importorskip("trl")  # noqa: F841
    from mixpo.integrations.trl import MixpoDPOConfig

    args = MixpoDPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **options)
    assert args.loss_config() == dataclasses.replace(expected, token_metrics=True)


def test_a_gamma_tensor_works_in_the_module_as_in_the_function():
    hidden, head, labels, ref = batch()
    gamma = torch.tensor([0.1, 0.7])
    want = mixpo.linear_preference_loss(hidden, head.weight, labels, ref_logps=ref, gamma=gamma)
    module = mixpo.LinearPreferenceLoss(gamma=gamma)
    torch.testing.assert_close(module(hidden, head, labels, ref_logps=ref).loss, want.loss)
    other = mixpo.LinearPreferenceLoss()(hidden, head, labels, ref_logps=ref, gamma=gamma)
    torch.testing.assert_close(other.loss, want.loss)


def test_sft_combines_with_reference_free_types_and_simpo_keeps_its_margin():
    config = LossConfig(loss_type=["simpo", "sft"], loss_weights=[1.0, 0.3])
    assert config.reference_free and config.fixed_gamma == 0.5
    assert LossConfig(loss_type="simpo").loss_type == ("simpo",)       # always a tuple
    hidden, head, labels, _ = batch()
    both = mixpo.linear_preference_loss(hidden, head.weight, labels,
                                        loss_type=["simpo", "sft"], loss_weights=[1.0, 0.0])
    alone = mixpo.linear_preference_loss(hidden, head.weight, labels, loss_type="simpo")
    torch.testing.assert_close(both.loss, alone.loss)
    with pytest.raises(ValueError, match="mixes reference-free and reference-based"):
        LossConfig(loss_type=["simpo", "sigmoid"])


def test_unknown_options_are_named():
    hidden, head, labels, ref = batch()
    with pytest.raises(TypeError, match=r"unknown loss option\(s\) \['betta'\]"):
        mixpo.linear_preference_loss(hidden, head.weight, labels, ref_logps=ref, betta=0.1)
    with pytest.raises(TypeError, match="unknown loss option"):
        mixpo.PreferenceLoss(betta=0.1)


def test_a_config_missing_an_option_is_an_error_not_a_default():
    class Options:
        loss_type = ["sigmoid"]

    with pytest.raises(TypeError, match="Options has no loss option 'loss_weights'"):
        LossConfig.from_options(Options())


def test_help_texts_come_from_the_one_definition():
    from mixpo.loss_config import option_help
    from mixpo.train.config import TrainConfig

    for item in dataclasses.fields(TrainConfig):
        if item.name in user_options():
            assert item.metadata["help"] == option_help(item.name), item.name
    assert option_help("dpop_lambda") in mixpo.linear_preference_loss.__doc__
    assert option_help("dpop_lambda") in mixpo.PreferenceLoss.__doc__


@pytest.mark.parametrize("loss_type,gamma,center,expected", [
    ("sigmoid", 1.0, False, 1.0), ("simpo", None, False, 0.5), ("simpo", 2.0, False, 2.0),
    ("sigmoid", 1.0, True, 0.0)])
def test_one_gamma_po_configuration_for_both_front_doors(tmp_path, loss_type, gamma, center,
                                                         expected):
    """gamma-PO resolved once (AdaptiveMargin.from_options): the same gamma0 and the same
    evaluation margin from mixpo's TrainConfig and from MixpoDPOConfig."""
    from mixpo.margins import AdaptiveMargin
    from mixpo.train.config import TrainConfig, build_config

    options = dict(loss_type=loss_type, gamma=gamma, adaptive_margin=True, margin_center=center)
    cfg = build_config(TrainConfig, None, {"model_name_or_path": "m", "train_file": "t",
                                           "output_dir": str(tmp_path), **options})
    ours = AdaptiveMargin.from_options(cfg, seed=0)
    assert ours.evaluation_gamma == expected and ours.center == center
    pytest.importorskip("trl")
    from mixpo.integrations.trl import MixpoDPOConfig

    args = MixpoDPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False,
                          **{**options, "loss_type": [loss_type]})
    theirs = AdaptiveMargin.from_options(args, seed=0)
    assert (theirs.gamma0, theirs.evaluation_gamma) == (ours.gamma0, ours.evaluation_gamma)
    assert AdaptiveMargin.from_options(build_config(
        TrainConfig, None, {"model_name_or_path": "m", "train_file": "t"}), seed=0) is None


def test_trl_evaluation_uses_the_fixed_gamma_po_margin(tmp_path):
    """MixpoDPOTrainer.evaluate() with adaptive margins scores with gamma0, as a fixed-margin
    run with gamma = gamma0 does (it used the type's default, 0, before)."""
    pytest.importorskip("trl")
    import datasets

    from fixtures import build_tiny_causal_lm, build_tiny_tokenizer
    from mixpo.integrations.trl import MixpoDPOConfig, MixpoDPOTrainer
    from test_integration_trl import rows

    tokenizer = build_tiny_tokenizer([v for row in rows() for v in row.values()
                                      if isinstance(v, str)], chat_template=False)
    losses = {}
    for adaptive in (True, False):
        args = MixpoDPOConfig(output_dir=str(tmp_path / str(adaptive)), use_cpu=True, bf16=False,
                              per_device_eval_batch_size=4, report_to="none", max_length=64,
                              beta=0.3, gamma=1.0, adaptive_margin=adaptive, curriculum=False)
        trainer = MixpoDPOTrainer(model=build_tiny_causal_lm(tokenizer),
                                  ref_model=build_tiny_causal_lm(tokenizer), args=args,
                                  train_dataset=datasets.Dataset.from_list(rows(8)),
                                  eval_dataset=datasets.Dataset.from_list(rows(8, seed=3)),
                                  processing_class=tokenizer)
        losses[adaptive] = trainer.evaluate()["eval_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    assert losses[True] > 0.9          # policy == reference: -log s(-beta * 0 - 1) = 1.31
