"""mixpo.scoring.reward: reward-model margins with a tiny LlamaForSequenceClassification."""
import copy
import math

import datasets
import pytest
import torch

from mixpo.data.difficulty import prepare_dataset
from mixpo.scoring.reward import (check_reward_settings, load_reward_model,
                                  score_with_reward_model)
from fixtures import (build_tiny_reward_model, build_tiny_tokenizer, corpus_texts,
                           save_tiny_model, torch_threads, ultrafeedback_rows)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def rows():
    return ultrafeedback_rows(7)


@pytest.fixture(scope="module")
def reward_model(rows):
    tokenizer = build_tiny_tokenizer(corpus_texts(rows))
    return build_tiny_reward_model(tokenizer, seed=3), tokenizer


def _direct_reward(model, tokenizer, conversation, keep_last=None):
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if keep_last is not None:
        ids = ids[:, -keep_last:]
    with torch.no_grad():
        return model(input_ids=ids).logits[0, 0].item()


def test_rewards_match_unbatched_model_calls(rows, reward_model):
    model, tokenizer = reward_model
    dataset = datasets.Dataset.from_list(rows)
    scored = score_with_reward_model(dataset, model, tokenizer, batch_size=3)
    assert scored.column_names == dataset.column_names + ["reward_chosen", "reward_rejected"]
    for row, chosen, rejected in zip(rows, scored["reward_chosen"], scored["reward_rejected"]):
        # Padded batches must read the reward at each sequence's own last token.
        assert chosen == pytest.approx(_direct_reward(model, tokenizer, row["chosen"]), abs=1e-5)
        assert rejected == pytest.approx(_direct_reward(model, tokenizer, row["rejected"]),
                                         abs=1e-5)
    prepared, summary = prepare_dataset(scored, difficulty="reward", route_fraction=0.3)
    margins = sorted((c - r for c, r in zip(scored["reward_chosen"], scored["reward_rejected"])),
                     reverse=True)
    assert prepared["difficulty"] == pytest.approx(margins) and summary.hard == 2


def test_standard_rows_and_truncation(rows, reward_model):
    model, tokenizer = reward_model
    standard = datasets.Dataset.from_list([
        {"prompt": r["prompt"], "chosen": r["chosen"][1]["content"],
         "rejected": r["rejected"][1]["content"]} for r in rows])
    # With a chat template, plain strings are scored as the same one-turn chat.
    as_chat = score_with_reward_model(standard, model, tokenizer, batch_size=2)
    assert as_chat["reward_chosen"] == pytest.approx(
        [_direct_reward(model, tokenizer, r["chosen"]) for r in rows], abs=1e-5)
    scored = score_with_reward_model(standard, model, tokenizer, batch_size=2, max_length=6)
    assert scored["reward_rejected"] == pytest.approx(  # truncation keeps the end
        [_direct_reward(model, tokenizer, r["rejected"], keep_last=6) for r in rows], abs=1e-5)
    rescored = score_with_reward_model(scored, model, tokenizer, batch_size=2, max_length=6)
    assert rescored.column_names == scored.column_names  # old reward columns replaced
    assert rescored["reward_chosen"] == pytest.approx(scored["reward_chosen"], abs=1e-5)


def test_load_reward_model_checks_outputs(tmp_path, rows):
    path = save_tiny_model(tmp_path / "rm", rows, kind="reward")
    model, tokenizer = load_reward_model(str(path))
    assert model.config.num_labels == 1 and tokenizer.pad_token == "<pad>"
    two_labels = build_tiny_reward_model(tokenizer, num_labels=2)
    two_labels.save_pretrained(tmp_path / "classifier")
    tokenizer.save_pretrained(tmp_path / "classifier")
    with pytest.raises(ValueError, match="num_labels=1"):
        load_reward_model(str(tmp_path / "classifier"))


def test_bad_options_fail_before_the_model_loads(tmp_path, rows):
    missing = str(tmp_path / "no-model")  # loading it would fail with "cannot load"
    for device, message in (("bogus", "^--device 'bogus' is not a device"),
                            ("cuda:99", "^--device cuda:99: ")):
        with pytest.raises(ValueError, match=message):
            load_reward_model(missing, device=device)
    for settings, message in ((dict(max_length=0), "^--max-length must be >= 1 .*got 0$"),
                              (dict(max_length=-2), "^--max-length must be >= 1 .*got -2$"),
                              (dict(batch_size=0), "^--batch-size must be >= 1, got 0$")):
        with pytest.raises(ValueError, match=message):
            check_reward_settings(**settings)
        with pytest.raises(ValueError, match=message):  # before any row is rendered
            score_with_reward_model(datasets.Dataset.from_list(rows), None, None, **settings)


def test_a_non_finite_reward_is_an_error_naming_the_row(rows, reward_model):
    model, tokenizer = reward_model
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.score.weight[0, 0] = math.inf  # +inf and -inf terms: NaN scores
        broken.score.weight[0, 1] = -math.inf
    with pytest.raises(ValueError, match=r"^data.jsonl line 1, column 'reward_chosen': the "
                                         r"reward model returned nan \(a float16/bfloat16 "
                                         r"overflow\? try --dtype float32\)$"):
        score_with_reward_model(datasets.Dataset.from_list(rows), broken, tokenizer,
                                row_names=lambda i: f"data.jsonl line {i + 1}")


def test_empty_completion_is_named(rows, reward_model):
    bad = [dict(r) for r in rows]
    bad[5] = dict(bad[5], chosen=[bad[5]["chosen"][0], {"role": "assistant", "content": ""}])
    with pytest.raises(ValueError, match="row 5, column 'chosen': empty completion"):
        score_with_reward_model(datasets.Dataset.from_list(bad), *reward_model)
    with pytest.raises(ValueError, match="--batch-size"):
        score_with_reward_model(datasets.Dataset.from_list(rows), *reward_model, batch_size=0)
