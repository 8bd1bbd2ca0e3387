"""mixpo.data.pairs: pair construction from raw multi-completion rows."""
import math

import datasets
import numpy as np
import pytest

from mixpo.data.pairs import build_pairs, choose_pair
from fixtures import GARBLED_RESPONSE, RAW_SCORES, raw_completion_rows


@pytest.fixture
def raw():
    return datasets.Dataset.from_list(raw_completion_rows())


def _rejected_text(pair):
    return pair["rejected"][1]["content"]


def test_output_schema_order_and_summary(raw):
    pairs, summary = build_pairs(raw, strategy="best-worst")
    assert pairs.column_names == ["source", "prompt", "chosen", "rejected", "score_chosen",
                                  "score_rejected"]
    assert (summary.prompts, summary.pairs, summary.too_few_completions,
            summary.below_min_margin) == (4, 3, 1, 0)
    assert summary.ties == 1  # the prompt whose two completions score 5.0 and 5.0
    rows = raw.to_list()
    for pair, row in zip(pairs, rows[:3]):  # input order; the single-completion prompt is dropped
        assert pair["prompt"] == row["instruction"] and pair["source"] == row["source"]
        best = max(row["completions"], key=lambda c: c["overall_score"])
        assert pair["chosen"] == [{"role": "user", "content": row["instruction"]},
                                  {"role": "assistant", "content": best["response"]}]
        assert pair["rejected"][0] == {"role": "user", "content": row["instruction"]}
        assert pair["score_chosen"] == best["overall_score"]
    assert "dropped 1 with <2 completions" in summary.line()


def test_best_worst_takes_the_degenerate_outlier_and_mu2sigma_does_not(raw):
    worst, _ = build_pairs(raw, strategy="best-worst")
    assert _rejected_text(worst[0]) == GARBLED_RESPONSE
    assert worst[0]["score_rejected"] == min(RAW_SCORES)
    sweet, _ = build_pairs(raw, strategy="best-mu2sigma")
    scores = np.array(RAW_SCORES)
    target = scores.mean() - 2 * scores.std()
    others = scores[1:]  # the best (index 0) is never the rejected one
    assert sweet[0]["score_rejected"] == others[np.argmin(np.abs(others - target))]
    assert _rejected_text(sweet[0]) != GARBLED_RESPONSE
    # Three completions 6.0, 9.5, 3.0: target ~2.2, nearest other completion is 3.0.
    assert (sweet[1]["score_chosen"], sweet[1]["score_rejected"]) == (9.5, 3.0)


def test_choose_pair_never_returns_chosen_as_rejected():
    rng = np.random.default_rng(0)
    for strategy in ("best-worst", "best-random", "best-mu2sigma"):
        for scores in ([5.0, 5.0], [1.0, 9.0], [9.0, 9.0, 9.0], [3.0, 8.0, 8.0, 1.0]):
            chosen, rejected = choose_pair(np.array(scores), strategy, rng)
            assert chosen != rejected and scores[chosen] == max(scores)
            assert chosen == scores.index(max(scores))  # ties: earliest completion


def test_best_random_is_seeded_and_varies(raw):
    first, _ = build_pairs(raw, strategy="best-random", seed=3)
    again, _ = build_pairs(raw, strategy="best-random", seed=3)
    assert first.to_list() == again.to_list()
    picks = {build_pairs(raw, strategy="best-random", seed=seed)[0][0]["score_rejected"]
             for seed in range(12)}
    assert len(picks) > 2


def test_min_margin_drops_and_counts(raw):
    pairs, summary = build_pairs(raw, strategy="best-worst", min_margin=0.5)
    assert summary.pairs == len(pairs) == 2 and summary.below_min_margin == 1
    assert all(p["score_chosen"] - p["score_rejected"] >= 0.5 for p in pairs)
    with pytest.raises(ValueError, match="no pairs left"):
        build_pairs(raw, min_margin=100.0)


@pytest.mark.parametrize("score, message", [(math.nan, "score is nan"), (None, "missing score")])
def test_bad_score_names_row_and_completion(score, message):
    rows = raw_completion_rows()
    rows[1]["completions"][2]["overall_score"] = score
    expected = rf"^line 2, column 'completions\[2\].overall_score': {message}"
    with pytest.raises(ValueError, match=expected):
        build_pairs(datasets.Dataset.from_list(rows), row_names=lambda i: f"line {i + 1}")


def test_empty_response_and_missing_columns():
    rows = raw_completion_rows()
    rows[2]["completions"][0]["response"] = " "
    with pytest.raises(ValueError, match=r"row 2, column 'completions\[0\].response': empty"):
        build_pairs(datasets.Dataset.from_list(rows))
    with pytest.raises(ValueError, match="no 'completions' column"):
        build_pairs(datasets.Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}]))
    renamed = [{"question": r["instruction"], "completions": r["completions"]}
               for r in raw_completion_rows()]
    with pytest.raises(ValueError, match="no prompt column"):
        build_pairs(datasets.Dataset.from_list(renamed))
    with pytest.raises(ValueError, match="unknown strategy"):
        build_pairs(datasets.Dataset.from_list(raw_completion_rows()), strategy="best-median")


def test_custom_completion_keys():
    rows = [{"prompt": "p q",
             "completions": [{"text": "a b", "reward": 0.2}, {"text": "c", "reward": 0.9}]}]
    pairs, _ = build_pairs(datasets.Dataset.from_list(rows), strategy="best-worst")
    assert pairs[0]["chosen"][1]["content"] == "c" and pairs[0]["score_rejected"] == 0.2
    with pytest.raises(ValueError, match="completion has no 'quality' key"):
        build_pairs(datasets.Dataset.from_list(rows), score_key="quality")
