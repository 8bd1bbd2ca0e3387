"""`mixpo data pairs | prepare | inspect` (the model-based `score-*` commands of the same group
live in `mixpo.scoring.cli`).

`register` only builds argparse parsers; each handler imports the library code it runs, so
`mixpo --help` stays fast. Handlers raise ValueError / FileNotFoundError for user errors,
which mixpo.cli prints as one line (exit code 2).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings

from mixpo.data.kinds import (DIFFICULTY_KINDS, DIFFICULTY_LABELS, ORDERS, PAIR_STRATEGIES,
                              describe)


def _quiet_datasets() -> None:
    """The CLI prints its own one-line summaries; datasets' progress bars would bury them."""
    import datasets

    datasets.disable_progress_bars()


@contextlib.contextmanager
def one_line_data_warnings():
    """Inside: each DataWarning (mixpo.data.formats) is printed as one `mixpo data: warning:
    ...` line on stderr, every time (not once per place); other warnings as usual."""
    from mixpo.data.formats import DataWarning

    with warnings.catch_warnings():
        warnings.simplefilter("always", DataWarning)
        show = warnings.showwarning

        def show_one_line(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, DataWarning):
                print(f"mixpo data: warning: {message}", file=sys.stderr, flush=True)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = show_one_line
        yield


def add_input(parser: argparse.ArgumentParser, output: bool = True) -> None:
    parser.add_argument("input", metavar="IN",
                        help=".jsonl, .json or .parquet file, or a save_to_disk directory")
    if output:
        parser.add_argument("-o", "--output", metavar="OUT", required=True,
                            help="output; its extension picks the format (.jsonl, .json, "
                            ".parquet; a directory -> save_to_disk); written atomically")
    parser.add_argument("--split", help="split of a saved DatasetDict (e.g. train_prefs)")


def _add_score_columns(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--score-columns", nargs=2, metavar=("CHOSEN", "REJECTED"),
                        help="rating columns when not score_chosen/score_rejected or "
                        "chosen_rating/rejected_rating")


def _add_difficulty(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--difficulty", choices=tuple(DIFFICULTY_KINDS), default="rating",
                        help=describe(DIFFICULTY_KINDS) + " (default: rating)")


def _score_columns(args: argparse.Namespace) -> tuple[str, str] | None:
    return tuple(args.score_columns) if args.score_columns else None


def rewrite(args: argparse.Namespace, transform, keeps_columns: bool = True) -> int:
    """Load IN, run `transform(dataset, row_names) -> (dataset, summary line)`, write OUT
    atomically and print the summary line. A transform that `keeps_columns` (every input
    column goes to OUT) has OUT checked first, so an output it cannot write fails before the
    work (a binary column to JSON); DataWarnings are printed as one line each."""
    _quiet_datasets()
    from mixpo.data.io import check_output, load_rows, save_rows

    owner = f"mixpo data {args.data_command}"
    dataset, row_names = load_rows(args.input, args.split)
    check_output(dataset if keeps_columns else dataset.select_columns([]), args.output, owner)
    with one_line_data_warnings():
        result, line = transform(dataset, row_names)
    save_rows(result, args.output, owner)
    print(f"{line} -> {args.output}")
    return 0


def _handle_pairs(args: argparse.Namespace) -> int:
    from mixpo.data.pairs import build_pairs

    def transform(dataset, row_names):
        pairs, summary = build_pairs(dataset, strategy=args.strategy, min_margin=args.min_margin,
                                     seed=args.seed, row_names=row_names,
                                     response_key=args.response_key, score_key=args.score_key)
        return pairs, summary.line()

    return rewrite(args, transform, keeps_columns=False)  # completions become chosen/rejected


def prepare_transform(args: argparse.Namespace):
    """The `prepare` step as a `rewrite` transform, `(dataset, row_names) -> (dataset, line)`;
    `mixpo.scoring.cli` runs it after computing a model-based column (--embedding-model)."""
    from mixpo.data.difficulty import prepare_dataset

    def transform(dataset, row_names):
        prepared, summary = prepare_dataset(
            dataset, difficulty=args.difficulty, route_below=args.route_below,
            route_at_or_below=args.route_at_or_below, route_fraction=args.route_fraction,
            select_easiest=args.select_easiest, order=args.order,
            swap_band_ablation=args.swap_band, seed=args.seed,
            score_columns=_score_columns(args), row_names=row_names)
        return prepared, summary.line()

    return transform


def handle_prepare(args: argparse.Namespace) -> int:
    return rewrite(args, prepare_transform(args))


def _handle_inspect(args: argparse.Namespace) -> int:
    _quiet_datasets()
    from mixpo.data.inspect import inspect_margins, plot_margin_histogram
    from mixpo.data.io import load_rows

    dataset, row_names = load_rows(args.input, args.split)
    with one_line_data_warnings():
        report, values = inspect_margins(
            dataset, difficulty=args.difficulty, route_below=args.route_below,
            route_at_or_below=args.route_at_or_below, score_columns=_score_columns(args),
            row_names=row_names)
    for line in report.lines():
        print(line)
    if args.plot:
        label = DIFFICULTY_LABELS[args.difficulty]
        plot_margin_histogram(values, args.plot, title=f"{args.input}: {label}",
                              route_below=args.route_below,
                              route_at_or_below=args.route_at_or_below, label=label)
        hard = f", the {report.would_be_hard} hard (SFT) pairs in red" \
            if report.would_be_hard is not None \
            else "; add --route-below D to see which pairs D routes"
        print(f"histogram -> {args.plot} (with the fraction of pairs at or below each value"
              f"{hard})")
    return 0


def _add_thresholds(group, what: str = "hard (SFT) pairs") -> None:
    group.add_argument("--route-below", type=float, metavar="D",
                       help=f"{what}: difficulty < D, strict (MixDPO's base rule: 0.5 on "
                       "UltraFeedback = the tied pairs, about 12 %%)")
    group.add_argument("--route-at-or-below", type=float, metavar="D",
                       help=f"{what}: difficulty <= D, inclusive (MixDPO's Argilla variant: "
                       "0.5)")


def register(subparsers):
    """Add `data` and its sub-commands to the top-level `mixpo` parser; returns the group's
    subparsers, where `mixpo.scoring.cli` adds the model-based commands."""
    data = subparsers.add_parser("data", help="build, score, order and inspect preference data",
                                 description="Everything before the loss: pairs, difficulty, "
                                 "curriculum order, selection and routing.")
    commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    commands.required = True

    pairs = commands.add_parser("pairs", help="one pair per prompt from scored completions")
    add_input(pairs)
    pairs.add_argument("--strategy", choices=tuple(PAIR_STRATEGIES), default="best-mu2sigma",
                       help=describe(PAIR_STRATEGIES) + " (default: best-mu2sigma)")
    pairs.add_argument("--min-margin", type=float, help="drop pairs with a smaller score gap")
    pairs.add_argument("--seed", type=int, default=0, help="seed for best-random")
    pairs.add_argument("--response-key", help="completion key of the text (default: response)")
    pairs.add_argument("--score-key", help="completion key of the score (default: overall_score)")
    pairs.set_defaults(func=_handle_pairs)

    prepare = commands.add_parser(
        "prepare", help="difficulty, routing flag, selection, order",
        description="Adds `difficulty` (bigger = easier: the rating or reward margin, minus "
        "the validation loss, or the embedding distance) and `hard` (MixDPO routing flag), "
        "keeps every input column, optionally keeps only the easiest pairs, and orders the "
        "rows (easy-first by default).")
    add_input(prepare)
    _add_difficulty(prepare)
    route = prepare.add_mutually_exclusive_group()
    _add_thresholds(route)
    route.add_argument("--route-fraction", type=float, metavar="Q",
                       help="hard (SFT) pairs: the hardest round(Q * n) pairs. Not a MixDPO "
                       "setting: the paper routes by threshold (its '10/25/50 %%' ablations "
                       "are --route-below 0.5 / 1.0 / 1.5)")
    prepare.add_argument("--select-easiest", type=float, metavar="TAU",
                         help="Selective DPO: drop pairs whose chosen equals rejected, keep "
                         "the easiest int(TAU * n) of the rest (floor, as the authors; 0.5), "
                         "and record TAU in a `selected_easiest` column; a file that has that "
                         "column is refused")
    prepare.add_argument("--order", choices=tuple(ORDERS), default="easy-first",
                         help=describe(ORDERS) + " (default: easy-first)")
    prepare.add_argument("--swap-band", action="store_true",
                         help="MixDPO's 10%% swap ablation: swap the 80-90%% and 90-100%% bands")
    prepare.add_argument("--seed", type=int, default=0, help="seed for --order shuffle")
    _add_score_columns(prepare)
    prepare.set_defaults(func=handle_prepare)

    inspect = commands.add_parser("inspect", help="margin statistics and histogram")
    add_input(inspect, output=False)
    _add_difficulty(inspect)
    inspect.add_argument("--plot", metavar="P.png", help="save a histogram of the margins")
    _add_thresholds(inspect.add_mutually_exclusive_group(),
                    "also count the pairs this would route to SFT")
    _add_score_columns(inspect)
    inspect.set_defaults(func=_handle_inspect)
    return commands
