"""Look at a preference dataset's difficulty before training: margin quantiles, ties, how many
pairs a routing threshold would send to SFT, and a histogram like MixDPO's Figure 2 (score-gap
distributions of UltraFeedback and argilla)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import datasets
import numpy as np

from mixpo.data.difficulty import compute_difficulty, route_hard
from mixpo.data.formats import DataWarning, check_preference_rows, row_warnings
from mixpo.data.io import RowNamer, default_row_names

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


@dataclass(frozen=True)
class MarginReport:
    """Summary of a dataset's difficulty values (bigger = easier)."""

    rows: int
    layout: str
    difficulty: str
    quantiles: dict[float, float]
    mean: float
    ties: int
    route_below: float | None
    would_be_hard: int | None
    route_at_or_below: float | None = None

    def lines(self) -> list[str]:
        quantiles = "  ".join(f"q{int(q * 100)}={v:g}" for q, v in self.quantiles.items())
        lines = [f"rows: {self.rows} ({self.layout})",
                 f"{self.difficulty} difficulty (bigger = easier): mean={self.mean:g}  {quantiles}",
                 f"ties (difficulty == 0): {self.ties} ({self.ties / self.rows:.1%})"]
        for option, threshold in (("--route-below", self.route_below),
                                  ("--route-at-or-below", self.route_at_or_below)):
            if threshold is not None:
                lines.append(f"would be hard with {option} {threshold:g}: "
                             f"{self.would_be_hard} ({self.would_be_hard / self.rows:.1%})")
        return lines


def inspect_margins(dataset: datasets.Dataset, difficulty: str = "rating",
                    route_below: float | None = None,
                    score_columns: tuple[str, str] | None = None,
                    row_names: RowNamer = default_row_names,
                    route_at_or_below: float | None = None) -> tuple[MarginReport, np.ndarray]:
    """Difficulty statistics of `dataset` (see mixpo.data.difficulty for the kinds), with how
    many pairs `route_below` (difficulty < D) or `route_at_or_below` (<= D, MixDPO's Argilla
    rule) would route to SFT; at most one of the two.

    Returns (the report, the difficulty values [n] for plotting). Rows are validated as in
    `prepare_dataset`, with the same ValueErrors, and warned about as there (DataWarning).
    """
    layout = check_preference_rows(dataset, row_names)
    values = compute_difficulty(dataset, difficulty, score_columns, row_names)
    for message in row_warnings(dataset, row_names):
        warnings.warn(message, DataWarning, stacklevel=2)
    would_be_hard = None
    if route_below is not None or route_at_or_below is not None:
        would_be_hard = int(route_hard(values, route_below=route_below,
                                       route_at_or_below=route_at_or_below).sum())
    report = MarginReport(
        rows=len(values), layout=layout, difficulty=difficulty,
        quantiles={q: float(np.quantile(values, q)) for q in QUANTILES},
        mean=float(values.mean()), ties=int(np.count_nonzero(values == 0)),
        route_below=route_below, would_be_hard=would_be_hard,
        route_at_or_below=route_at_or_below)
    return report, values


def plot_margin_histogram(values: np.ndarray, path: str, title: str = "",
                          route_below: float | None = None, label: str = "rating margin",
                          route_at_or_below: float | None = None) -> None:
    """Save a histogram of `values` to `path` (PNG) for choosing a routing threshold: the
    pairs a threshold (`route_below` or `route_at_or_below`) routes to SFT in red beside the
    DPO pairs with the threshold drawn, and on a second axis the fraction of pairs at or below
    each value (how many a threshold there would route). Uses matplotlib's Agg backend, so it
    needs no display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(values, dtype=np.float64)
    distinct = np.unique(values)
    # Ratings sit on a grid (UltraFeedback: half points): one bar per grid value reads better
    # than arbitrary bins, as in MixDPO's Figure 2.
    step = float(np.min(np.diff(distinct))) if len(distinct) > 1 else 1.0
    grid_size = int(round((distinct[-1] - distinct[0]) / step)) + 1
    if grid_size <= 100:
        bins = distinct[0] - step / 2 + step * np.arange(grid_size + 1)
    else:
        bins = 50
    threshold = route_below if route_below is not None else route_at_or_below
    hard = np.zeros(len(values), dtype=bool) if threshold is None else \
        route_hard(values, route_below=route_below, route_at_or_below=route_at_or_below)
    figure, axes = plt.subplots(figsize=(6.5, 3.5))
    axes.hist([values[~hard], values[hard]], bins=bins, stacked=True,
              color=["#4c72b0", "#c44e52"], edgecolor="white",
              label=["DPO pairs", f"SFT (hard) pairs: {int(hard.sum())}"])
    if threshold is not None:
        words = "route below" if route_below is not None else "route at or below"
        axes.axvline(threshold, color="#c44e52", linestyle="--", label=f"{words} {threshold:g}")
    axes.set_xlabel(label)
    axes.set_ylabel("pairs")
    fraction = axes.twinx()
    ordered = np.sort(values)
    fraction.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), color="#555555",
                  drawstyle="steps-post", linewidth=1.2)
    fraction.set_ylim(0, 1)
    fraction.set_ylabel("fraction of pairs <= x", color="#555555")
    axes.legend(loc="upper right", fontsize=8)
    axes.set_title(title or f"{label} distribution ({len(values)} pairs)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
