"""The data side of `MixpoDPOTrainer` (mixpo.integrations.trl): MixDPO routing flags, the
curriculum order, the collator that carries mixpo's per-pair columns, and the check that
precomputed reference log-probs over several processes can be shared."""
from __future__ import annotations

import numpy as np
import torch

from mixpo.data.kinds import ORDERS
from mixpo.integrations.trl_head import PASSTHROUGH

ROUTE_OPTIONS = ("route_below", "route_at_or_below", "route_fraction")


class PassthroughCollator:
    """TRL's preference collator, plus the per-pair columns mixpo reads (PASSTHROUGH)."""

    def __init__(self, collator, columns=PASSTHROUGH):
        self.collator, self.columns = collator, columns

    def __call__(self, examples):
        batch = self.collator(examples)
        for column in self.columns:
            if column in examples[0]:
                values = [example[column] for example in examples]
                dtype = torch.bool if column == "hard" else torch.float32
                batch[column] = torch.tensor(values, dtype=dtype)
        return batch


def routing_configured(args) -> bool:
    return args.routing_column is not None or any(getattr(args, name) is not None
                                                  for name in ROUTE_OPTIONS)


def check_routing_column(dataset, column: str) -> None:
    """The routing column must hold booleans (a string "false" would route every pair)."""
    if column not in dataset.column_names:
        raise ValueError(f"routing_column {column!r} is not a column of the dataset "
                         f"(columns: {dataset.column_names})")
    for index, value in enumerate(dataset[column]):
        if not isinstance(value, bool):
            raise ValueError(f"row {index}, column {column!r}: routing flags must be true/false, "
                             f"got {value!r}")


class Difficulty:
    """A dataset's pair difficulties (bigger = easier), computed once and on demand: its own
    `difficulty` column when it has one (`mixpo data prepare` wrote it), else
    `args.difficulty` computed as `mixpo data prepare` computes it."""

    def __init__(self, dataset, args):
        self.dataset, self.args, self._values = dataset, args, None

    @property
    def source(self) -> str:
        if "difficulty" in self.dataset.column_names:
            return "the dataset's `difficulty` column"
        return f"{self.args.difficulty} difficulty"

    def values(self) -> np.ndarray:
        if self._values is None:
            if "difficulty" in self.dataset.column_names:
                self._values = np.asarray(self.dataset["difficulty"], dtype=np.float64)
            else:
                from mixpo.data.difficulty import compute_difficulty

                columns = tuple(self.args.score_columns) if self.args.score_columns else None
                self._values = compute_difficulty(self.dataset, self.args.difficulty, columns)
        return self._values


def with_routing(dataset, args, difficulty: Difficulty):
    """The dataset with a `hard` column when routing is configured (and only then)."""
    if args.routing_column is not None:
        check_routing_column(dataset, args.routing_column)
        if args.routing_column != "hard":
            if "hard" in dataset.column_names:
                dataset = dataset.remove_columns("hard")
            dataset = dataset.add_column("hard", dataset[args.routing_column])
        return dataset
    if not routing_configured(args):
        return dataset.remove_columns("hard") if "hard" in dataset.column_names else dataset
    from mixpo.data.difficulty import route_hard

    thresholds = {name: getattr(args, name) for name in ROUTE_OPTIONS
                  if getattr(args, name) is not None}
    hard = route_hard(difficulty.values(), **thresholds)
    if "hard" in dataset.column_names:
        dataset = dataset.remove_columns("hard")
    return dataset.add_column("hard", hard.tolist())


def curriculum_on(args, dataset) -> bool:
    """`curriculum`, or by default: on when routing, an `order` or a prepared `difficulty`
    column is there."""
    if args.curriculum is not None:
        if args.curriculum is False and args.order is not None:
            raise ValueError(f"order={args.order!r} is the curriculum's order; with "
                             "curriculum=False TRL shuffles (drop one of them)")
        return args.curriculum
    return routing_configured(args) or args.order is not None or (
        dataset is not None and "difficulty" in dataset.column_names)


def curriculum_order(dataset, args, difficulty: Difficulty) -> tuple:
    """(the dataset in the curriculum order, a sentence saying which): `order` (default
    easy-first) as `mixpo data prepare --order` applies it, the same stable sort by the same
    difficulty."""
    from mixpo.data.difficulty import easy_first_order

    order = args.order or "easy-first"
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if order == "as-is":
        return dataset, "the dataset's own order (order='as-is')"
    if order == "shuffle":
        rows = np.random.default_rng(args.seed).permutation(len(dataset))
        return dataset.select(rows.tolist()), f"a permutation seeded by seed={args.seed} " \
            "(order='shuffle')"
    try:
        values = difficulty.values()
    except ValueError as error:
        raise ValueError(f"the curriculum orders pairs easy-first by difficulty, and {error}; "
                         "pass order='as-is' to keep the dataset's order, or curriculum=False "
                         "to shuffle") from None
    rows = easy_first_order(values)
    return dataset.select(rows.tolist()), f"easy-first by {difficulty.source} (the stable " \
        "sort of `mixpo data prepare`)"


def check_precompute_cache(args, *datasets) -> None:
    """trl 1.16 caches precomputed reference log-probs next to the dataset's files; an
    in-memory dataset's cache folder (or any, with datasets' caching disabled) is per process,
    so with several processes every rank but the first fails after the whole reference pass.
    Refuse before it."""
    if not args.precompute_ref_log_probs or args.world_size <= 1:
        return
    import datasets as hf_datasets

    for dataset in datasets:
        splits = dataset.values() if isinstance(dataset, dict) else [dataset]
        for split in splits:
            files = getattr(split, "cache_files", None)
            if files is not None and (files == [] or not hf_datasets.is_caching_enabled()):
                raise ValueError(
                    f"precompute_ref_log_probs with {args.world_size} processes needs datasets "
                    "with files on disk (datasets.load_from_disk / load_dataset): trl caches "
                    "the reference log-probs next to them, and an in-memory dataset's cache "
                    "is private to each process")
