"""mixpo.scoring.validation: Selective DPO's held-out validation loss on a tiny Llama."""
import math
import random

import datasets
import numpy as np
import pytest
import torch

import mixpo.scoring.validation as validation
from mixpo.data.difficulty import prepare_dataset
from mixpo.scoring.validation import ValidationSettings, score_pairs, score_validation_loss
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


@pytest.fixture(scope="module")
def tiny():
    rows = _labelled_rows()
    tokenizer = build_tiny_tokenizer(corpus_texts(rows) + corpus_texts(ultrafeedback_rows(4)))
    return rows, tokenizer, build_tiny_causal_lm(tokenizer, seed=1)


@pytest.fixture(scope="module")
def scored(tiny):
    rows, tokenizer, model = tiny
    settings = ValidationSettings(seeds=(41,), evals=2, batch_size=2, learning_rate=3e-3, beta=0.5)
    return score_pairs(datasets.Dataset.from_list(rows), model, tokenizer, settings)


def test_mislabeled_pairs_score_as_the_hardest(tiny, scored):
    rows, tokenizer, model = tiny
    scores, summary = scored
    flipped = np.array([r["flipped"] for r in rows])
    # Reference models learn GOOD > BAD from their training half (three pairs in four), so
    # the held-out flipped pairs get the largest DPO losses.
    assert scores[flipped].min() > scores[~flipped].max()
    assert (summary.reference_models, summary.scores_per_pair) == (2, 2)
    untouched = build_tiny_causal_lm(tokenizer, seed=1).state_dict()
    assert all(torch.equal(value, untouched[name]) for name, value in model.state_dict().items())


def test_unchanged_models_score_log_two_for_every_pair(tiny, monkeypatch):
    rows, tokenizer, model = tiny
    runs = []
    original = validation.train_reference_model

    def recording(initial, batches, train_indices, ref, settings, seed, on_eval):
        steps = []
        original(initial, batches, train_indices, ref, settings, seed,
                 lambda trained, step: (steps.append(step), on_eval(trained, step)))
        runs.append((seed, sorted(train_indices.tolist()), steps))

    monkeypatch.setattr(validation, "train_reference_model", recording)
    settings = ValidationSettings(folds=2, seeds=(7, 8), evals=3, batch_size=4, epochs=2,
                                  learning_rate=0.0)
    scores, summary = score_pairs(datasets.Dataset.from_list(rows), model, tokenizer, settings)
    # lr 0: every reference model stays the initial model, so h = 0 and loss = log 2.
    assert np.allclose(scores, math.log(2), atol=1e-6)
    assert summary.scores_per_pair == 2 * 3 and summary.reference_models == 4
    for seed in (7, 8):
        train_sets = [train for s, train, _ in runs if s == seed]
        held_out = [sorted(set(range(16)) - set(train)) for train in train_sets]
        assert sorted(held_out[0] + held_out[1]) == list(range(16))  # halves partition the data
    # 8 training pairs / batch 4 x 2 epochs = 4 steps; evals every 4 // 3 = 1 step, 3 times.
    assert all(steps == [1, 2, 3] for _, _, steps in runs)


def test_settings_are_checked(tiny):
    rows, tokenizer, model = tiny
    dataset = datasets.Dataset.from_list(rows)
    with pytest.raises(ValueError, match="--folds must be >= 2"):
        score_pairs(dataset, model, tokenizer, ValidationSettings(folds=1))
    with pytest.raises(ValueError, match="fewer than --evals 5"):
        score_pairs(dataset, model, tokenizer, ValidationSettings(batch_size=8))
    with pytest.raises(ValueError, match="cannot be split into 3 folds"):
        score_pairs(dataset.select([0, 1]), model, tokenizer, ValidationSettings(folds=3))


def test_prepare_selects_the_easiest_by_validation_loss(tiny, scored):
    dataset = datasets.Dataset.from_list(tiny[0])
    scores = scored[0]
    prepared, summary = prepare_dataset(dataset.add_column("validation_loss", scores.tolist()),
                                        difficulty="validation-loss", select_easiest=0.75)
    assert not any(prepared["flipped"]) and len(prepared) == 12  # Selective DPO drops them
    assert prepared["validation_loss"] == sorted(prepared["validation_loss"])
    assert summary.ties is None and summary.dropped_by_request == 4


def test_model_loaded_frozen_from_disk_still_trains(tmp_path):
    rows = _labelled_rows(8, flipped_every=8)
    path = save_tiny_model(tmp_path / "policy", rows, kind="causal-lm")
    settings = ValidationSettings(seeds=(3,), evals=1, batch_size=2, learning_rate=1e-2, beta=0.5)
    scored, summary = score_validation_loss(datasets.Dataset.from_list(rows), str(path), settings)
    losses = np.array(scored["validation_loss"])
    assert scored.column_names == list(rows[0]) + ["validation_loss"]
    assert not np.allclose(losses, math.log(2))  # the loaded (frozen) model was trained
    assert losses[7] == losses.max()  # the one flipped pair
    rescored, _ = score_validation_loss(scored, str(path), settings)
    assert rescored["validation_loss"] == pytest.approx(scored["validation_loss"])


def test_micro_batches_accumulate_to_the_same_step(tiny):
    rows, tokenizer, model = tiny
    dataset = datasets.Dataset.from_list(rows)
    whole = ValidationSettings(seeds=(5,), evals=1, batch_size=4, micro_batch_size=None,
                               learning_rate=1e-2, beta=0.5)
    split = ValidationSettings(seeds=(5,), evals=1, batch_size=4, micro_batch_size=1,
                               learning_rate=1e-2, beta=0.5)
    scores_whole, _ = score_pairs(dataset, model, tokenizer, whole)
    scores_split, _ = score_pairs(dataset, model, tokenizer, split)
    assert not np.allclose(scores_whole, math.log(2))
    assert scores_split == pytest.approx(scores_whole, rel=1e-4, abs=1e-5)
