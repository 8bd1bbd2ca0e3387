"""Pair difficulty, curriculum order, Selective DPO selection and MixDPO routing.

`difficulty` is one number per pair where BIGGER MEANS EASIER, whatever its source:
- 'rating' (MixDPO's default): rating margin score_chosen - score_rejected;
- 'reward': reward-model margin reward_chosen - reward_rejected (`mixpo data score-reward`);
- 'validation-loss' (Selective DPO): minus the mean validation DPO loss
  (`mixpo data score-validation`), since a smaller loss marks an easier pair.
One direction keeps every rule the same: easy-first = descending difficulty,
`route_below=D` routes pairs with difficulty < D, the hardest fraction is the tail of the
easy-first order, `select_easiest=TAU` keeps its head.

Orders (`mixpo.data.kinds.ORDERS`; MixDPO and Selective DPO both feed the data without
shuffling): 'easy-first' is a stable sort by difficulty, descending (ties keep input order);
'as-is' keeps the input order (MixDPO's "shuffled" ablation is the dataset's original order,
routing kept and curriculum off); 'shuffle' is a seeded random permutation.
`swap_band` is MixDPO's "10 % swap" robustness ablation: in the easy-first order the 80-90 %
band and the 90-100 % band trade places.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import datasets
import numpy as np

from mixpo.data.formats import (REWARD_COLUMNS, VALIDATION_LOSS_COLUMN, check_preference_rows,
                                read_column_scores, resolve_score_columns)
from mixpo.data.io import RowNamer, default_row_names
from mixpo.data.kinds import DIFFICULTY_KINDS, ORDERS



def compute_difficulty(dataset: datasets.Dataset, kind: str = "rating",
                       score_columns: tuple[str, str] | None = None,
                       row_names: RowNamer = default_row_names) -> np.ndarray:
    """Difficulty of every pair, float64 [n], bigger = easier (module docstring).

    Args:
        kind: 'rating', 'reward' or 'validation-loss'.
        score_columns: (chosen, rejected) rating columns for 'rating' when they are not one
            of the known names (score_chosen/score_rejected, chosen_rating/rejected_rating, ...).
    Raises ValueError naming the row and column of a missing, NaN or non-numeric score.
    """
    if kind == "rating":
        chosen_column, rejected_column = resolve_score_columns(dataset.column_names, score_columns)
    elif kind == "reward":
        chosen_column, rejected_column = REWARD_COLUMNS
        if not set(REWARD_COLUMNS) <= set(dataset.column_names):
            raise ValueError(f"no {'/'.join(REWARD_COLUMNS)} columns; score the pairs first "
                             "with `mixpo data score-reward`")
    elif kind == "validation-loss":
        if VALIDATION_LOSS_COLUMN not in dataset.column_names:
            raise ValueError(f"no {VALIDATION_LOSS_COLUMN!r} column; score the pairs first "
                             "with `mixpo data score-validation`")
        return -read_column_scores(dataset, VALIDATION_LOSS_COLUMN, row_names)
    else:
        raise ValueError(f"unknown difficulty {kind!r}; choose from {', '.join(DIFFICULTY_KINDS)}")
    return (read_column_scores(dataset, chosen_column, row_names)
            - read_column_scores(dataset, rejected_column, row_names))


def easy_first_order(difficulty: np.ndarray) -> np.ndarray:
    """Row indices sorted easy -> hard (difficulty descending); a stable sort, so equal
    difficulties keep their input order."""
    return np.argsort(-np.asarray(difficulty, dtype=np.float64), kind="stable")


def swap_band(order: np.ndarray) -> np.ndarray:
    """MixDPO's 10 % swap: the rows at 80-90 % of `order` and those at 90-100 % trade places
    (the hardest tenth moves in front of the next-hardest tenth)."""
    n = len(order)
    start, middle = math.floor(0.8 * n), math.floor(0.9 * n)
    return np.concatenate([order[:start], order[middle:], order[start:middle]])


def fraction_count(fraction: float, n: int, option: str) -> int:
    """round(fraction * n) rows, for a fraction in [0, 1]."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{option} must be a fraction in [0, 1], got {fraction}")
    return int(math.floor(fraction * n + 0.5))


def route_hard(difficulty: np.ndarray, route_below: float | None = None,
               route_fraction: float | None = None) -> np.ndarray:
    """MixDPO's routing flag per pair, bool [n]: True = train on the SFT loss.

    `route_below=D`: difficulty < D (MixDPO: 0.5 on UltraFeedback = the tied pairs).
    `route_fraction=Q`: the hardest round(Q * n) pairs, i.e. the tail of the stable easy-first
    order (ties at the boundary go by input order). Neither: no pair is hard.
    """
    difficulty = np.asarray(difficulty, dtype=np.float64)
    if route_below is not None and route_fraction is not None:
        raise ValueError("choose one of --route-below and --route-fraction")
    if route_below is not None:
        if not math.isfinite(route_below):
            raise ValueError(f"--route-below must be finite, got {route_below}")
        return difficulty < route_below
    hard = np.zeros(len(difficulty), dtype=bool)
    if route_fraction is not None:
        count = fraction_count(route_fraction, len(difficulty), "--route-fraction")
        if count:
            hard[easy_first_order(difficulty)[-count:]] = True
    return hard


@dataclass(frozen=True)
class PrepareSummary:
    """What `prepare_dataset` did, for the one-line report."""

    rows_in: int
    rows_out: int
    hard: int
    ties: int | None
    dropped_by_request: int
    difficulty: str
    order: str

    def line(self) -> str:
        ties = "n/a" if self.ties is None else self.ties
        return (f"prepare ({self.difficulty}, {self.order}): {self.rows_in} rows in, "
                f"{self.rows_out} out, {self.hard} hard, {ties} ties, "
                f"{self.dropped_by_request} dropped by --select-easiest")


def _count_ties(dataset: datasets.Dataset, kind: str, difficulty: np.ndarray,
                score_columns, row_names: RowNamer) -> int | None:
    """Pairs whose two scores are equal (MixDPO's tied pairs): counted on the rating columns
    when the data has valid ones, else on the reward margin; None when neither applies."""
    if kind == "rating":
        return int(np.count_nonzero(difficulty == 0))
    try:
        margin = compute_difficulty(dataset, "rating", score_columns, row_names)
    except ValueError:  # no (valid) ratings: they are not what this run is scored on
        return int(np.count_nonzero(difficulty == 0)) if kind == "reward" else None
    return int(np.count_nonzero(margin == 0))


def prepare_dataset(dataset: datasets.Dataset, difficulty: str = "rating",
                    route_below: float | None = None, route_fraction: float | None = None,
                    select_easiest: float | None = None, order: str = "easy-first",
                    swap_band_ablation: bool = False, seed: int = 0,
                    score_columns: tuple[str, str] | None = None,
                    row_names: RowNamer = default_row_names,
                    ) -> tuple[datasets.Dataset, PrepareSummary]:
    """Score, select, route and order preference pairs for MixDPO / Selective DPO training.

    Args:
        dataset: preference rows (standard, conversational or implicit-prompt; see
            mixpo.data.formats) with the columns `difficulty` needs.
        difficulty: 'rating', 'reward' or 'validation-loss' (module docstring).
        route_below / route_fraction: MixDPO routing (see `route_hard`), at most one;
            applied to the rows left after selection.
        select_easiest: keep the easiest TAU fraction (Selective DPO; round(TAU * n) rows).
        order: 'easy-first' (default), 'as-is' (the input order) or 'shuffle' (a random
            permutation seeded by `seed`).
        swap_band_ablation: MixDPO's 10 % swap of the easy-first order.
        score_columns: rating columns (chosen, rejected) when not one of the known names.
        row_names: names row i in error messages.
    Returns:
        (rows in their new order, every input column kept plus `difficulty` (float) and
        `hard` (bool), overwriting earlier ones; a PrepareSummary).
    Raises:
        ValueError naming the row and column for bad scores or empty chosen/rejected, and for
        inconsistent options.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose from {', '.join(ORDERS)}")
    if swap_band_ablation and order != "easy-first":
        raise ValueError("--swap-band permutes the easy-first order; it needs --order easy-first")
    if route_below is not None and route_fraction is not None:
        raise ValueError("choose one of --route-below and --route-fraction")
    check_preference_rows(dataset, row_names)
    scores = compute_difficulty(dataset, difficulty, score_columns, row_names)
    ties = _count_ties(dataset, difficulty, scores, score_columns, row_names)

    sorted_rows = easy_first_order(scores)
    kept = sorted_rows
    if select_easiest is not None:
        kept = sorted_rows[:fraction_count(select_easiest, len(scores), "--select-easiest")]
        if len(kept) == 0:
            raise ValueError(f"--select-easiest {select_easiest} keeps no rows of {len(scores)}")
    hard = np.zeros(len(scores), dtype=bool)
    hard[kept] = route_hard(scores[kept], route_below, route_fraction)

    if order == "easy-first":
        rows = swap_band(kept) if swap_band_ablation else kept
    elif order == "as-is":
        rows = np.sort(kept)
    else:
        rows = np.random.default_rng(seed).permutation(np.sort(kept))

    extra = [c for c in ("difficulty", "hard") if c in dataset.column_names]
    result = dataset.remove_columns(extra) if extra else dataset
    result = result.add_column("difficulty", scores.tolist()).add_column("hard", hard.tolist())
    result = result.select(rows.tolist())
    summary = PrepareSummary(rows_in=len(dataset), rows_out=len(rows), hard=int(hard[rows].sum()),
                             ties=ties, dropped_by_request=len(dataset) - len(rows),
                             difficulty=difficulty,
                             order=order + (" +swap-band" if swap_band_ablation else ""))
    return result, summary
