"""mixpo.data.difficulty: difficulty kinds, easy-first order, selection, routing, swap band."""
import math
import warnings

import datasets
import numpy as np
import pytest

from mixpo.data.difficulty import (compute_difficulty, easy_first_order, fraction_count,
                                   prepare_dataset, route_hard, select_count, swap_band)
from mixpo.data.formats import DataWarning
from mixpo.data.io import RowNames
from fixtures import argilla_rows, ultrafeedback_rows


@pytest.fixture
def uf():
    return datasets.Dataset.from_list(ultrafeedback_rows(20))


def _margins(dataset):
    return [c - r for c, r in zip(dataset["score_chosen"], dataset["score_rejected"])]


def test_rating_difficulty_and_columns(uf):
    assert compute_difficulty(uf).tolist() == _margins(uf)
    argilla = datasets.Dataset.from_list(argilla_rows(6))
    expected = [c - r for c, r in zip(argilla["chosen_rating"], argilla["rejected_rating"])]
    assert compute_difficulty(argilla).tolist() == expected
    renamed = argilla.rename_columns({"chosen_rating": "judge_a", "rejected_rating": "judge_b"})
    assert compute_difficulty(renamed, score_columns=("judge_a", "judge_b")).tolist() == expected
    with pytest.raises(ValueError, match="--score-columns"):
        compute_difficulty(renamed)


def test_reward_and_validation_loss_difficulty(uf):
    rewards = uf.add_column("reward_chosen", [0.5] * 20)
    rewards = rewards.add_column("reward_rejected", [float(i) for i in range(20)])
    assert compute_difficulty(rewards, "reward").tolist() == [0.5 - i for i in range(20)]
    losses = [0.3 + 0.01 * i for i in range(20)]
    scored = uf.add_column("validation_loss", losses)
    # Smaller loss = easier, so the difficulty (bigger = easier) is the negated loss.
    assert compute_difficulty(scored, "validation-loss").tolist() == [-v for v in losses]
    with pytest.raises(ValueError, match="score-reward"):
        compute_difficulty(uf, "reward")
    with pytest.raises(ValueError, match="score-validation"):
        compute_difficulty(uf, "validation-loss")
    distances = [0.1 * i for i in range(20)]
    embedded = uf.add_column("embedding_distance", distances)
    # A bigger distance between the two responses is easier: the column as it is.
    assert compute_difficulty(embedded, "embedding").tolist() == distances
    with pytest.raises(ValueError, match="^no 'embedding_distance' column; score the pairs first "
                       "with `mixpo data score-embedding` or pass --embedding-model DIR"):
        compute_difficulty(uf, "embedding")
    with pytest.raises(ValueError, match="unknown difficulty"):
        compute_difficulty(uf, "length")


def test_easy_first_is_a_stable_descending_sort():
    difficulty = np.array([1.0, 3.0, 1.0, 0.0, 3.0, 1.0])
    assert easy_first_order(difficulty).tolist() == [1, 4, 0, 2, 5, 3]


def test_swap_band():
    order = np.arange(20)
    swapped = swap_band(order)
    # 80-90 % band = positions 16, 17; 90-100 % band = 18, 19: they trade places.
    assert swapped.tolist() == list(range(16)) + [18, 19, 16, 17]
    uneven = swap_band(np.arange(15))  # bands [12, 13) and [13, 15)
    assert uneven.tolist() == list(range(12)) + [13, 14, 12]
    assert sorted(swap_band(np.arange(7)).tolist()) == list(range(7))


def test_route_hard():
    difficulty = np.array([2.0, 0.0, 0.5, 0.0, 3.0, 1.0, 0.0, 4.0, 2.5, 1.5])
    assert route_hard(difficulty, route_below=0.5).tolist() == (difficulty < 0.5).tolist()
    # Hardest 20 %: two of the three zeros, the later ones in input order (stable tail).
    assert np.flatnonzero(route_hard(difficulty, route_fraction=0.2)).tolist() == [3, 6]
    assert not route_hard(difficulty).any()
    assert route_hard(difficulty, route_fraction=1.0).all()
    with pytest.raises(ValueError, match="choose one"):
        route_hard(difficulty, route_below=1.0, route_fraction=0.1)
    with pytest.raises(ValueError, match="--route-below and --route-at-or-below"):
        route_hard(difficulty, route_below=1.0, route_at_or_below=1.0)
    with pytest.raises(ValueError, match="--route-at-or-below must be finite"):
        route_hard(difficulty, route_at_or_below=math.nan)
    with pytest.raises(ValueError, match="fraction in"):
        route_hard(difficulty, route_fraction=1.5)


def test_prepare_orders_easy_first_and_keeps_columns(uf):
    prepared, summary = prepare_dataset(uf, route_below=0.5)
    assert prepared.column_names == uf.column_names + ["difficulty", "hard"]
    margins = _margins(uf)
    expected_order = sorted(range(20), key=lambda i: -margins[i])  # Python's sort is stable
    assert prepared["prompt_id"] == [uf[i]["prompt_id"] for i in expected_order]
    assert prepared["difficulty"] == [margins[i] for i in expected_order]
    assert prepared["hard"] == [margins[i] < 0.5 for i in expected_order]
    ties = sum(m == 0 for m in margins)
    assert (summary.rows_in, summary.rows_out, summary.hard, summary.ties,
            summary.dropped_by_request) == (20, 20, sum(m < 0.5 for m in margins), ties, 0)
    assert prepared[0]["chosen"] == uf[expected_order[0]]["chosen"]  # rows travel whole
    again, _ = prepare_dataset(prepared)  # re-preparing replaces difficulty / hard
    assert again.column_names == prepared.column_names and not any(again["hard"])


def test_select_easiest_then_route_fraction(uf):
    prepared, summary = prepare_dataset(uf, select_easiest=0.5, route_fraction=0.2)
    margins = sorted(_margins(uf), reverse=True)
    assert len(prepared) == 10 and prepared["difficulty"] == margins[:10]
    assert prepared["hard"] == [False] * 8 + [True] * 2  # hardest 20 % of the kept rows
    assert (summary.dropped_by_request, summary.hard) == (10, 2)
    assert "10 dropped by --select-easiest" in summary.line()
    with pytest.raises(ValueError, match="keeps no rows"):
        prepare_dataset(uf, select_easiest=0.01)


def test_selective_dpo_keeps_lowest_validation_loss(uf):
    losses = [float(v) for v in np.random.default_rng(0).uniform(0.2, 1.2, 20)]
    prepared, summary = prepare_dataset(uf.add_column("validation_loss", losses),
                                        difficulty="validation-loss", select_easiest=0.25)
    assert prepared["validation_loss"] == sorted(losses)[:5]  # ascending loss = easy first
    assert summary.ties == sum(m == 0 for m in _margins(uf))  # rating ties still reported
    no_ratings = uf.remove_columns(["score_chosen", "score_rejected"])
    no_ratings = no_ratings.add_column("validation_loss", losses)
    assert prepare_dataset(no_ratings, difficulty="validation-loss")[1].ties is None


def test_orders_as_is_shuffle_and_swap_band(uf):
    as_is, _ = prepare_dataset(uf, order="as-is", route_fraction=0.1)
    assert as_is["prompt_id"] == uf["prompt_id"] and sum(as_is["hard"]) == 2
    shuffled, _ = prepare_dataset(uf, order="shuffle", seed=5, route_below=0.5)
    assert prepare_dataset(uf, order="shuffle", seed=5)[0]["prompt_id"] == shuffled["prompt_id"]
    assert shuffled["prompt_id"] != uf["prompt_id"]
    assert sorted(shuffled["prompt_id"]) == sorted(uf["prompt_id"])
    assert sum(shuffled["hard"]) == sum(m < 0.5 for m in _margins(uf))  # routing kept
    sorted_rows, _ = prepare_dataset(uf)
    swapped, summary = prepare_dataset(uf, swap_band_ablation=True)
    ids = sorted_rows["prompt_id"]
    assert swapped["prompt_id"] == ids[:16] + ids[18:] + ids[16:18]
    assert "+swap-band" in summary.line()
    with pytest.raises(ValueError, match="needs --order easy-first"):
        prepare_dataset(uf, order="shuffle", swap_band_ablation=True)
    with pytest.raises(ValueError, match="unknown order"):
        prepare_dataset(uf, order="hard-first")


@pytest.mark.parametrize("column, value, message", [
    ("score_chosen", math.nan, "column 'score_chosen': score is nan"),
    ("score_rejected", None, "column 'score_rejected': missing score"),
])
def test_bad_scores_name_the_row(column, value, message):
    rows = ultrafeedback_rows(6)
    rows[4][column] = value
    with pytest.raises(ValueError, match=f"^data.jsonl line 5, {message}"):
        prepare_dataset(datasets.Dataset.from_list(rows),
                        row_names=lambda i: f"data.jsonl line {i + 1}")


def test_empty_chosen_is_an_error_not_a_drop():
    rows = ultrafeedback_rows(6)
    rows[2]["chosen"][1]["content"] = ""
    with pytest.raises(ValueError, match="^row 2, column 'chosen': empty completion"):
        prepare_dataset(datasets.Dataset.from_list(rows))


def test_trl_standard_and_conversational_rows():
    rows = ultrafeedback_rows(6)
    standard = [{"prompt": r["prompt"], "chosen": r["chosen"][1]["content"],
                 "rejected": r["rejected"][1]["content"], "score_chosen": r["score_chosen"],
                 "score_rejected": r["score_rejected"]} for r in rows]
    conversational = [{"prompt": [r["chosen"][0]], "chosen": [r["chosen"][1]],
                       "rejected": [r["rejected"][1]], "score_chosen": r["score_chosen"],
                       "score_rejected": r["score_rejected"]} for r in rows]
    expected = sorted(_margins(datasets.Dataset.from_list(rows)), reverse=True)
    for layout in (standard, conversational):
        prepared, _ = prepare_dataset(datasets.Dataset.from_list(layout), route_below=0.5)
        assert prepared["difficulty"] == expected
        assert prepared.column_names == list(layout[0]) + ["difficulty", "hard"]


def test_route_at_or_below_is_inclusive():
    # MixDPO's base rule is strict (< 0.5: the ties), its Argilla variant inclusive (<= 0.5).
    difficulty = np.array([0.0, 0.5, 1.0, 0.5, 0.49])
    assert route_hard(difficulty, route_below=0.5).tolist() == [True, False, False, False, True]
    assert route_hard(difficulty, route_at_or_below=0.5).tolist() == [True, True, False, True,
                                                                       True]
    argilla = datasets.Dataset.from_list(argilla_rows(12))
    margins = compute_difficulty(argilla)
    prepared, summary = prepare_dataset(argilla, route_at_or_below=1.0)
    assert summary.hard == sum(m <= 1.0 for m in margins) > sum(m < 1.0 for m in margins)
    assert prepared["hard"] == [d <= 1.0 for d in prepared["difficulty"]]
    with pytest.raises(ValueError, match="choose one of"):
        prepare_dataset(argilla, route_below=0.5, route_at_or_below=0.5)


def _numbered_rows(n):
    rows = ultrafeedback_rows(n)
    for index, row in enumerate(rows):  # distinct margins: no ties at the cut
        row["score_rejected"], row["score_chosen"] = 1.0, 1.0 + index / n
    return rows


def test_select_easiest_keeps_the_floor_as_the_authors():
    assert (select_count(0.5, 101), fraction_count(0.5, 101, "--route-fraction")) == (50, 51)
    assert select_count(0.29, 100) == 28  # Python's int(0.29 * 100), as theirs
    dataset = datasets.Dataset.from_list(_numbered_rows(101))
    prepared, summary = prepare_dataset(dataset, select_easiest=0.5)
    assert len(prepared) == 50 and summary.dropped_by_request == 51
    assert prepared["prompt_id"] == [f"p{i:04d}" for i in range(100, 50, -1)]
    with pytest.raises(ValueError, match="--select-easiest must be a fraction"):
        prepare_dataset(dataset, select_easiest=1.5)


def test_select_easiest_drops_identical_pairs_first():
    rows = _numbered_rows(21)
    rows[20] = dict(rows[20], rejected=[rows[20]["rejected"][0], rows[20]["chosen"][1]])
    rows[3] = dict(rows[3], rejected=rows[3]["chosen"])
    prepared, summary = prepare_dataset(datasets.Dataset.from_list(rows), select_easiest=0.5)
    # 19 pairs remain (the easiest, row 20, was one response twice); int(0.5 * 19) = 9 kept.
    assert prepared["prompt_id"] == [f"p{i:04d}" for i in range(19, 10, -1)]
    assert (summary.rows_in, summary.rows_out, summary.identical_dropped,
            summary.dropped_by_request) == (21, 9, 2, 10)
    assert summary.line().endswith("10 dropped by --select-easiest 0.5 (floor), 2 dropped as "
                                   "chosen == rejected")
    with pytest.warns(DataWarning, match=r"^2 of 21 pairs have chosen == rejected \(the "
                      r"first: row 3\); they teach nothing .*--select-easiest drops them"):
        unselected, summary = prepare_dataset(datasets.Dataset.from_list(rows))
    assert len(unselected) == 21 and "chosen == rejected" not in summary.line()


def test_prepare_warns_only_about_what_it_keeps():
    rows = _numbered_rows(6)
    rows[2] = dict(rows[2], rejected=rows[2]["chosen"])
    dataset = datasets.Dataset.from_list(rows + [rows[4]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_dataset(dataset, select_easiest=1.0)  # drops (and reports) the identical pair
        prepare_dataset(datasets.Dataset.from_list(rows[3:]))  # nothing to warn about
    assert [str(w.message) for w in caught if w.category is DataWarning] == [
        "1 of 7 rows repeats an earlier row exactly (the first: row 6 repeats row 4); each copy "
        "trains on its pair again"]


def test_a_selection_is_recorded_and_never_applied_twice(uf):
    selected, _ = prepare_dataset(uf, select_easiest=0.5)
    assert selected["selected_easiest"] == [0.5] * 10
    with pytest.raises(ValueError, match=r"^sel.jsonl already selected the easiest 0.5 of its "
                       r"pairs \(column 'selected_easiest'\); drop --select-easiest or use the "
                       "unselected file"):
        prepare_dataset(selected, select_easiest=0.5, row_names=RowNames("sel.jsonl"))
    with pytest.raises(ValueError, match="already selected the easiest 0.5"):
        prepare_dataset(selected, select_easiest=1.0, order="shuffle")
    routed, _ = prepare_dataset(selected, route_below=0.5, order="as-is")  # other prepares
    assert routed["selected_easiest"] == [0.5] * 10 and len(routed) == 10
