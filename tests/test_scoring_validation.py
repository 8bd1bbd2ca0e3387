"""mixpo.scoring.validation: Selective DPO's held-out validation loss on a tiny Llama, with
LoRA reference models (the authors' default) and full-parameter ones."""
import math
import random

import datasets
import numpy as np
import pytest
import torch

import mixpo.scoring.validation as validation
from mixpo.data.difficulty import prepare_dataset
from mixpo.scoring.validation import (ValidationSettings, score_pairs, score_validation_loss,
                                      split_folds)
from fixtures import (WORDS, build_tiny_causal_lm, build_tiny_tokenizer, corpus_texts,
                      save_tiny_model, torch_threads, ultrafeedback_rows)

GOOD = "yes good answer because energy"
BAD = "no wrong maybe no"


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    with torch_threads(1):
        yield


def _labelled_rows(n=16, flipped_every=4):
    """Pairs preferring GOOD over BAD; every `flipped_every`-th pair has its labels flipped."""
    rng = random.Random(0)
    rows = []
    for index in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(5))
        good = [{"role": "user", "content": prompt}, {"role": "assistant", "content": GOOD}]
        bad = [{"role": "user", "content": prompt}, {"role": "assistant", "content": BAD}]
        flipped = index % flipped_every == flipped_every - 1
        rows.append({"prompt": prompt, "chosen": bad if flipped else good,
                     "rejected": good if flipped else bad, "flipped": flipped})
    return rows


def _small(**overrides):
    """Settings for 16 pairs: one seed, small batches, a learning rate that moves a tiny model."""
    return ValidationSettings(**{"seeds": (41,), "evals": 2, "batch_size": 2,
                                 "learning_rate": 3e-2, "beta": 0.5, **overrides})


@pytest.fixture(scope="module")
def tiny():
    rows = _labelled_rows()
    tokenizer = build_tiny_tokenizer(corpus_texts(rows) + corpus_texts(ultrafeedback_rows(4)))
    return rows, tokenizer, build_tiny_causal_lm(tokenizer, seed=1)


@pytest.fixture(scope="module")
def scored(tiny):
    rows, tokenizer, model = tiny
    return score_pairs(datasets.Dataset.from_list(rows), model, tokenizer, _small(), log=None)


def _unchanged(model, tokenizer):
    fresh = build_tiny_causal_lm(tokenizer, seed=1).state_dict()
    state = model.state_dict()
    return set(state) == set(fresh) and all(torch.equal(v, fresh[k]) for k, v in state.items())


def test_defaults_are_the_authors_lora_settings():
    settings = ValidationSettings()
    assert (settings.learning_rate, settings.batch_size, settings.warmup_ratio, settings.beta,
            settings.epochs, settings.seeds, settings.folds, settings.evals) == \
        (3e-5, 512, 0.1, 0.01, 1, (41, 42, 43), 2, 5)
    assert (settings.full_parameter, settings.lora_r, settings.lora_alpha,
            settings.lora_dropout) == (False, 16, 16, 0.05)
    assert settings.lora_target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                            "up_proj", "down_proj")
    # Llama-3 on UltraFeedback (NOTES: 30567 // 512 = 59 steps, scored at 11, 22, ..., 55);
    # the training keeps the last short batch: 60 steps.
    assert settings.schedule(30567) == (60, 11, 5)


def test_lora_reference_models_flag_the_mislabeled_pairs(tiny, scored):
    rows, tokenizer, model = tiny
    scores, summary = scored
    flipped = np.array([r["flipped"] for r in rows])
    # Reference models learn GOOD > BAD from their training half (three pairs in four), so
    # the held-out flipped pairs get the largest DPO losses.
    assert scores[flipped].min() > scores[~flipped].max()
    assert (summary.reference_models, summary.scores_per_pair) == (2, 2)
    assert summary.method.startswith("LoRA r 16 alpha 16 dropout 0.05 on q_proj,k_proj,v_proj")
    # The adapters are removed after each reference model: the model is exactly as it was,
    # requires_grad flags included (a freshly built model has them all set).
    assert _unchanged(model, tokenizer) and all(p.requires_grad for p in model.parameters())
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_lora_training_changes_the_adapters_and_the_scores(tiny, monkeypatch):
    rows, tokenizer, model = tiny
    seen = []
    original = validation.held_out_losses

    def inspecting(policy, batches, indices, ref, batch_size):
        trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
        seen.append((sorted({n.split(".")[-4] for n in trainable}),  # module names
                     max(p.abs().max().item() for n, p in trainable.items() if "lora_B" in n),
                     {p.dtype for p in trainable.values()}))
        return original(policy, batches, indices, ref, batch_size)

    monkeypatch.setattr(validation, "held_out_losses", inspecting)
    bf16 = build_tiny_causal_lm(tokenizer, seed=1).to(torch.bfloat16)
    scores, _ = score_pairs(datasets.Dataset.from_list(rows), bf16, tokenizer,
                            _small(evals=1, lora_target_modules=("q_proj", "v_proj", "mlp_in")),
                            log=None)
    # Only LoRA A/B of the targets that exist train; lora_B starts at zero and has moved; the
    # adapters are fp32 on a bf16 model, so AdamW's states are fp32.
    assert [names for names, _, _ in seen] == [["q_proj", "v_proj"]] * 2
    assert all(moved > 0 for _, moved, _ in seen)
    assert all(dtypes == {torch.float32} for _, _, dtypes in seen)
    assert not np.allclose(scores, math.log(2), atol=1e-3)  # B = 0 would score log 2


def test_scoring_schedule_5_per_model_15_per_pair(tiny, monkeypatch):
    rows, tokenizer, model = tiny
    runs = []
    original = validation.train_reference_model

    def recording(initial, batches, train_indices, ref, settings, seed, on_eval):
        steps = []
        original(initial, batches, train_indices, ref, settings, seed,
                 lambda trained, step: (steps.append(step), on_eval(trained, step)))
        runs.append((seed, sorted(train_indices.tolist()), steps))

    monkeypatch.setattr(validation, "train_reference_model", recording)
    settings = ValidationSettings(batch_size=1, learning_rate=0.0)  # seeds 41-43, 5 evals
    scores, summary = score_pairs(datasets.Dataset.from_list(rows), model, tokenizer, settings,
                                  log=None)
    # lr 0: every reference model stays the starting model, so h = 0 and loss = log 2.
    assert np.allclose(scores, math.log(2), atol=1e-6)
    assert (summary.reference_models, summary.scores_per_pair) == (6, 15)
    # 8 training pairs, batch 1: 8 steps, scored every 8 // 5 = 1 step, 5 times.
    assert [steps for _, _, steps in runs] == [[1, 2, 3, 4, 5]] * 6
    for seed in (41, 42, 43):
        train_sets = [train for s, train, _ in runs if s == seed]
        # The authors' halves: np.random.seed(seed); permutation(n); the first n // 2 are
        # held out by the first model, the rest by the second.
        permutation = np.random.RandomState(seed).permutation(16)
        assert train_sets == [sorted(permutation[8:].tolist()), sorted(permutation[:8].tolist())]


def test_split_folds_cuts_at_n_over_folds():
    halves = split_folds(7, 41, 2)
    assert [len(h) for h in halves] == [3, 4]
    assert sorted(np.concatenate(halves).tolist()) == list(range(7))
    assert [len(p) for p in split_folds(10, 0, 3)] == [3, 3, 4]


def test_full_parameter_reference_models_still_work(tiny):
    rows, tokenizer, model = tiny
    scores, summary = score_pairs(datasets.Dataset.from_list(rows), model, tokenizer,
                                  _small(full_parameter=True, learning_rate=3e-3), log=None)
    flipped = np.array([r["flipped"] for r in rows])
    assert scores[flipped].min() > scores[~flipped].max()
    assert summary.method == "full-parameter; lr 0.003" and _unchanged(model, tokenizer)


def test_progress_lines_are_printed(tiny, capsys):
    rows, tokenizer, model = tiny
    score_pairs(datasets.Dataset.from_list(rows), model, tokenizer, _small(seeds=(41, 42)))
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and lines[0].startswith("score-validation: reference log-probs")
    models = [line for line in lines if "reference model" in line]
    assert [line.split("(")[0] for line in models] == [
        f"score-validation: reference model {k}/4 " for k in range(1, 5)]
    assert "(seed 42, held-out part 2/2: 8 pairs)" in models[3]
    assert "; lr 0.03, 4 steps of 2 pairs on 8, scoring every 2 steps" in models[0]
    scorings = [line for line in lines if "held-out DPO loss" in line]
    assert len(scorings) == 8 and "(scoring 2/2)" in scorings[-1]


def test_settings_are_checked(tiny):
    rows, tokenizer, model = tiny
    dataset = datasets.Dataset.from_list(rows)
    with pytest.raises(ValueError, match="--folds must be >= 2"):
        score_pairs(dataset, model, tokenizer, ValidationSettings(folds=1))
    # The authors' effective batch 512 is far more than 8 training pairs: a clear error with
    # the largest batch that gives 5 scorings, not a silent change of the schedule.
    with pytest.raises(ValueError, match=r"^--batch-size 512 on the 8 training pairs of a fold "
                       r"gives 1 optimizer step\(s\), too few for --evals 5 scorings; use "
                       r"--batch-size 1 or less"):
        score_pairs(dataset, model, tokenizer, ValidationSettings())
    with pytest.raises(ValueError, match="use --batch-size 7 or less"):
        ValidationSettings(batch_size=8, evals=2).check(16)
    with pytest.raises(ValueError, match="cannot be split into 3 folds"):
        score_pairs(dataset.select([0, 1]), model, tokenizer, ValidationSettings(folds=3))
    with pytest.raises(ValueError, match="--lora-r must be >= 1"):
        _small(lora_r=0).check(16)
    with pytest.raises(ValueError, match="none of the LoRA target modules"):
        score_pairs(dataset, model, tokenizer, _small(lora_target_modules=("c_attn",)), log=None)
    with pytest.raises(ValueError, match=r"^--lora-target-modules \['lm_head'\]: a LoRA on "
                       "the LM head is not supported"):
        score_pairs(dataset, model, tokenizer,
                    _small(lora_target_modules=("q_proj", "lm_head")), log=None)
    _small(full_parameter=True, lora_r=0).check(16)  # LoRA settings unused without LoRA
    # Each bad count is named on its own, and checked before the model or the data is used.
    for option, field, value in (("--max-length", "max_length", 0),
                                 ("--max-length", "max_length", -4),
                                 ("--max-prompt-length", "max_prompt_length", 0),
                                 ("--micro-batch-size", "micro_batch_size", 0),
                                 ("--epochs", "epochs", -1), ("--evals", "evals", 0)):
        with pytest.raises(ValueError, match=rf"^{option} must be >= [12]\b.*got {value}$"):
            _small(**{field: value}).check_options()
    with pytest.raises(ValueError, match="^--device 'bogus' is not a device"):
        score_validation_loss(dataset, "/no/such/model", _small(device="bogus"))


def test_a_non_finite_validation_loss_is_an_error_naming_the_row(tiny, monkeypatch):
    rows, tokenizer, model = tiny

    def nan_scores(dataset, *args, **kwargs):
        scores = np.linspace(0.5, 0.7, len(dataset))
        scores[3] = np.nan
        return scores, None

    monkeypatch.setattr(validation, "score_pairs", nan_scores)
    monkeypatch.setattr(validation, "load_tokenizer", lambda path: tokenizer)
    monkeypatch.setattr(validation, "load_causal_lm", lambda *args, **kwargs: model)
    dupes = [dict(rows[0], rejected=rows[0]["chosen"])] + rows  # dropped: the names shift
    with pytest.raises(ValueError, match=r"^line 5, column 'validation_loss': the validation "
                                         r"DPO loss is nan \(a float16/bfloat16 overflow\?"):
        score_validation_loss(datasets.Dataset.from_list(dupes), "tiny", _small(),
                              row_names=lambda i: f"line {i + 1}", log=None)


def test_prepare_selects_the_easiest_by_validation_loss(tiny, scored):
    dataset = datasets.Dataset.from_list(tiny[0])
    scores = scored[0]
    prepared, summary = prepare_dataset(dataset.add_column("validation_loss", scores.tolist()),
                                        difficulty="validation-loss", select_easiest=0.75)
    assert not any(prepared["flipped"]) and len(prepared) == 12  # Selective DPO drops them
    assert prepared["validation_loss"] == sorted(prepared["validation_loss"])
    assert summary.ties is None and summary.dropped_by_request == 4


def test_loaded_model_trains_and_identical_pairs_are_dropped(tmp_path):
    rows = _labelled_rows(9, flipped_every=8)
    rows[4] = dict(rows[4], rejected=rows[4]["chosen"])  # chosen == rejected: dropped, counted
    path = save_tiny_model(tmp_path / "policy", rows, kind="causal-lm")
    settings = _small(seeds=(3,), evals=1, learning_rate=3e-2)
    scored, summary = score_validation_loss(datasets.Dataset.from_list(rows), str(path), settings,
                                            log=None)
    losses = np.array(scored["validation_loss"])
    assert scored.column_names == list(rows[0]) + ["validation_loss"]
    assert len(scored) == 8 and summary.identical_dropped == 1
    assert "8 pairs (1 dropped as chosen == rejected)" in summary.line()
    assert scored["prompt"] == [r["prompt"] for i, r in enumerate(rows) if i != 4]
    assert not np.allclose(losses, math.log(2))  # the loaded (frozen) model was trained
    assert losses[6] == losses.max()  # the one flipped pair (row 7, after the dropped row 4)
    rescored, _ = score_validation_loss(scored, str(path), settings, log=None)
    assert rescored["validation_loss"] == pytest.approx(scored["validation_loss"])
    bad = [dict(r) for r in rows]
    bad[6] = dict(bad[6], chosen=[bad[6]["chosen"][0], {"role": "assistant", "content": " "}])
    with pytest.raises(ValueError, match="^row 6, column 'chosen': empty completion"):
        score_validation_loss(datasets.Dataset.from_list(bad), str(path), settings, log=None)


@pytest.mark.parametrize("full_parameter", [False, True])
def test_micro_batches_accumulate_to_the_same_step(tiny, full_parameter):
    rows, tokenizer, model = tiny
    dataset = datasets.Dataset.from_list(rows)
    # LoRA dropout off: with it, each micro-batch split draws other dropout masks.
    common = dict(seeds=(5,), evals=1, batch_size=4, learning_rate=1e-2, beta=0.5,
                  lora_dropout=0.0, full_parameter=full_parameter)
    scores_whole, _ = score_pairs(dataset, model, tokenizer,
                                  ValidationSettings(micro_batch_size=None, **common), log=None)
    scores_split, _ = score_pairs(dataset, model, tokenizer,
                                  ValidationSettings(micro_batch_size=1, **common), log=None)
    assert not np.allclose(scores_whole, math.log(2))
    assert scores_split == pytest.approx(scores_whole, rel=1e-4, abs=1e-5)
