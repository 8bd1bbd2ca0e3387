"""Pair difficulty, curriculum order, Selective DPO selection and MixDPO routing.

`difficulty` is one number per pair where BIGGER MEANS EASIER, whatever its source:
- 'rating' (MixDPO's default): rating margin score_chosen - score_rejected;
- 'reward': reward-model margin reward_chosen - reward_rejected (`mixpo data score-reward`);
- 'validation-loss' (Selective DPO): minus the mean validation DPO loss
  (`mixpo data score-validation`), since a smaller loss marks an easier pair;
- 'embedding' (MixDPO section 6): cosine distance between the embeddings of the chosen and
  the rejected response (`mixpo data score-embedding`); the authors sort it descending, so
  more different responses are easier.
One direction keeps every rule the same: easy-first = descending difficulty,
`route_below=D` routes pairs with difficulty < D (`route_at_or_below=D`: <= D), the hardest
fraction is the tail of the easy-first order, `select_easiest=TAU` keeps its head.

Orders (`mixpo.data.kinds.ORDERS`; MixDPO and Selective DPO both feed the data without
shuffling): 'easy-first' is a stable sort by difficulty, descending (ties keep input order);
'as-is' keeps the input order (MixDPO's "shuffled" ablation is the dataset's original order,
routing kept and curriculum off); 'shuffle' is a seeded random permutation.
`swap_band` is MixDPO's "10 % swap" robustness ablation: in the easy-first order the 80-90 %
band and the 90-100 % band trade places.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import datasets
import numpy as np

from mixpo.data.formats import (EMBEDDING_DISTANCE_COLUMN, REWARD_COLUMNS,
                                SELECTED_EASIEST_COLUMN, VALIDATION_LOSS_COLUMN, DataWarning,
                                check_preference_rows, identical_pairs, read_column_scores,
                                resolve_score_columns, row_warnings)
from mixpo.data.io import RowNamer, default_row_names
from mixpo.data.kinds import DIFFICULTY_KINDS, ORDERS

ROUTE_OPTIONS = ("--route-below", "--route-at-or-below", "--route-fraction")


def compute_difficulty(dataset: datasets.Dataset, kind: str = "rating",
                       score_columns: tuple[str, str] | None = None,
                       row_names: RowNamer = default_row_names) -> np.ndarray:
    """Difficulty of every pair, float64 [n], bigger = easier (module docstring).

    Args:
        kind: 'rating', 'reward', 'validation-loss' or 'embedding'.
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
    elif kind == "embedding":
        if EMBEDDING_DISTANCE_COLUMN not in dataset.column_names:
            raise ValueError(f"no {EMBEDDING_DISTANCE_COLUMN!r} column; score the pairs first "
                             "with `mixpo data score-embedding` or pass --embedding-model DIR "
                             "to `mixpo data prepare`")
        return read_column_scores(dataset, EMBEDDING_DISTANCE_COLUMN, row_names)
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
    """round(fraction * n) rows (halves round up), for a fraction in [0, 1]: the size of
    `--route-fraction`'s hardest part, a mixpo option no paper fixes."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{option} must be a fraction in [0, 1], got {fraction}")
    return int(math.floor(fraction * n + 0.5))


def select_count(tau: float, n: int) -> int:
    """int(tau * n) rows, the floor: Selective DPO keeps `select(range(int(len * tau)))` of the
    sorted pairs (glorgao/SelectiveDPO `run_selective_dpo.py`), so n = 101, tau = 0.5 keeps 50
    (rounding would keep 51). Python's float product, as theirs (0.29 * 100 -> 28)."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"--select-easiest must be a fraction in [0, 1], got {tau}")
    return int(tau * n)


def _check_routing(route_below, route_at_or_below, route_fraction) -> None:
    given = [name for name, value in zip(ROUTE_OPTIONS, (route_below, route_at_or_below,
                                                         route_fraction)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"choose one of {', '.join(ROUTE_OPTIONS)}; got {' and '.join(given)}")
    for name, value in zip(ROUTE_OPTIONS[:2], (route_below, route_at_or_below)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")


def route_hard(difficulty: np.ndarray, route_below: float | None = None,
               route_fraction: float | None = None,
               route_at_or_below: float | None = None) -> np.ndarray:
    """MixDPO's routing flag per pair, bool [n]: True = train on the SFT loss. At most one of:

    `route_below=D`: difficulty < D (MixDPO's base rule, strict: 0.5 on UltraFeedback = the
    tied pairs; QualityDPO `dpo_trainer.py` loss `noisy-tolerant-4-6`).
    `route_at_or_below=D`: difficulty <= D (their Argilla variant, `noisy-tolerant-4-6-agrilla`,
    routes margin <= 0.5).
    `route_fraction=Q`: the hardest round(Q * n) pairs, i.e. the tail of the stable easy-first
    order (ties at the boundary go by input order). None: no pair is hard.
    """
    difficulty = np.asarray(difficulty, dtype=np.float64)
    _check_routing(route_below, route_at_or_below, route_fraction)
    if route_below is not None:
        return difficulty < route_below
    if route_at_or_below is not None:
        return difficulty <= route_at_or_below
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
    select_easiest: float | None = None
    identical_dropped: int = 0

    def line(self) -> str:
        ties = "n/a" if self.ties is None else self.ties
        line = (f"prepare ({self.difficulty}, {self.order}): {self.rows_in} rows in, "
                f"{self.rows_out} out, {self.hard} hard, {ties} ties, "
                f"{self.dropped_by_request} dropped by --select-easiest")
        if self.select_easiest is not None:
            line += (f" {self.select_easiest:g} (floor), {self.identical_dropped} dropped as "
                     "chosen == rejected")
        return line


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


def _check_not_selected(dataset: datasets.Dataset, row_names: RowNamer) -> None:
    """Selecting twice halves the data twice (200 -> 100 -> 50): refuse data that carries
    the `selected_easiest` column a previous selection wrote."""
    if SELECTED_EASIEST_COLUMN not in dataset.column_names or len(dataset) == 0:
        return
    source = getattr(row_names, "source", "the data")
    previous = dataset[0][SELECTED_EASIEST_COLUMN]
    previous = f"{previous:g}" if isinstance(previous, (int, float)) else repr(previous)
    raise ValueError(f"{source} already selected the easiest {previous} of its pairs (column "
                     f"{SELECTED_EASIEST_COLUMN!r}); drop --select-easiest or use the "
                     "unselected file")


def prepare_dataset(dataset: datasets.Dataset, difficulty: str = "rating",
                    route_below: float | None = None, route_fraction: float | None = None,
                    select_easiest: float | None = None, order: str = "easy-first",
                    swap_band_ablation: bool = False, seed: int = 0,
                    score_columns: tuple[str, str] | None = None,
                    row_names: RowNamer = default_row_names,
                    route_at_or_below: float | None = None,
                    ) -> tuple[datasets.Dataset, PrepareSummary]:
    """Score, select, route and order preference pairs for MixDPO / Selective DPO training.

    Args:
        dataset: preference rows (standard, conversational or implicit-prompt; see
            mixpo.data.formats) with the columns `difficulty` needs.
        difficulty: 'rating', 'reward', 'validation-loss' or 'embedding' (module docstring).
        route_below / route_at_or_below / route_fraction: MixDPO routing (see `route_hard`),
            at most one; applied to the rows left after selection.
        select_easiest: Selective DPO's tau: drop the pairs whose chosen equals rejected, then
            keep the easiest int(TAU * n) of the rest (the floor, as the authors;
            `select_count`), and record TAU in a `selected_easiest` column. Data that already
            has that column is refused (ValueError), so a selection is never applied twice;
            preparing without `select_easiest` keeps the column.
        order: 'easy-first' (default), 'as-is' (the input order) or 'shuffle' (a random
            permutation seeded by `seed`).
        swap_band_ablation: MixDPO's 10 % swap of the easy-first order.
        score_columns: rating columns (chosen, rejected) when not one of the known names.
        row_names: names row i in error messages.
    Returns:
        (rows in their new order, every input column kept plus `difficulty` (float) and
        `hard` (bool), overwriting earlier ones, and `selected_easiest` (float) when selecting;
        a PrepareSummary).
    Raises:
        ValueError naming the row and column for bad scores or empty chosen/rejected, and for
        inconsistent options.
    Warns:
        DataWarning (`mixpo.data.formats.row_warnings`) for a single row, pairs whose chosen
        equals rejected (unless `select_easiest` drops them) and rows repeated exactly.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}; choose from {', '.join(ORDERS)}")
    if swap_band_ablation and order != "easy-first":
        raise ValueError("--swap-band permutes the easy-first order; it needs --order easy-first")
    _check_routing(route_below, route_at_or_below, route_fraction)
    if select_easiest is not None:
        _check_not_selected(dataset, row_names)
    check_preference_rows(dataset, row_names)
    scores = compute_difficulty(dataset, difficulty, score_columns, row_names)
    # --select-easiest drops (and reports) the identical pairs itself.
    for message in row_warnings(dataset, row_names, identical=select_easiest is None):
        warnings.warn(message, DataWarning, stacklevel=2)
    ties = _count_ties(dataset, difficulty, scores, score_columns, row_names)

    candidates = np.arange(len(scores))
    identical = 0
    if select_easiest is not None:
        same = identical_pairs(dataset, row_names)
        identical = int(same.sum())
        candidates = np.flatnonzero(~same)
    kept = candidates[easy_first_order(scores[candidates])]
    if select_easiest is not None:
        kept = kept[:select_count(select_easiest, len(candidates))]
        if len(kept) == 0:
            raise ValueError(f"--select-easiest {select_easiest} keeps no rows of "
                             f"{len(candidates)}")
    hard = np.zeros(len(scores), dtype=bool)
    hard[kept] = route_hard(scores[kept], route_below, route_fraction, route_at_or_below)

    if order == "easy-first":
        rows = swap_band(kept) if swap_band_ablation else kept
    elif order == "as-is":
        rows = np.sort(kept)
    else:
        rows = np.random.default_rng(seed).permutation(np.sort(kept))

    extra = [c for c in ("difficulty", "hard") if c in dataset.column_names]
    result = dataset.remove_columns(extra) if extra else dataset
    result = result.add_column("difficulty", scores.tolist()).add_column("hard", hard.tolist())
    if select_easiest is not None:
        result = result.add_column(SELECTED_EASIEST_COLUMN, [float(select_easiest)] * len(scores))
    result = result.select(rows.tolist())
    summary = PrepareSummary(rows_in=len(dataset), rows_out=len(rows), hard=int(hard[rows].sum()),
                             ties=ties, dropped_by_request=len(candidates) - len(rows),
                             difficulty=difficulty,
                             order=order + (" +swap-band" if swap_band_ablation else ""),
                             select_easiest=select_easiest, identical_dropped=identical)
    return result, summary
