"""Load and save preference data: .jsonl / .json / .parquet files and saved HF datasets.

Rows are held as a `datasets.Dataset` (what TRL users already pass around). Every loader
reports malformed input as a `ValueError` that names the file and the line (JSON Lines) or
row (other formats), and every writer is atomic: the data goes to a temporary path in the
output's directory and is moved over the output with `os.replace`, so a failed run never
leaves a partial output behind.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from mixpo.files import atomic_output

FILE_FORMATS = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class RowNames:
    """Names rows the way a user finds them again: `data.jsonl line 7` or `data.parquet row 6`.

    `line_numbers[i]` is the 1-based line of row i in a JSON Lines file; None elsewhere, where
    rows are named by their 0-based index.
    """

    source: str
    line_numbers: tuple[int, ...] | None = None

    def __call__(self, index: int) -> str:
        if self.line_numbers is not None:
            return f"{self.source} line {self.line_numbers[index]}"
        return f"{self.source} row {index}"


def default_row_names(index: int) -> str:
    """Row naming for in-memory datasets: `row 3`."""
    return f"row {index}"


RowNamer = Callable[[int], str]


def _arrow_accepts(rows: list[dict]) -> bool:
    try:
        pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        return False
    return True


def _schema_conflict(rows: list[dict], row_names: RowNamer) -> str:
    """Name the first row (and column) whose value types clash with the rows before it:
    bisect for the shortest prefix Arrow cannot hold as one table."""
    low, high = 1, len(rows)  # invariant: rows[:high] is rejected, rows[:low - 1] accepted
    while low < high:
        middle = (low + high) // 2
        if _arrow_accepts(rows[:middle]):
            low = middle + 1
        else:
            high = middle
    prefix = rows[:high]
    columns = [c for c in rows[high - 1] if not _arrow_accepts([{c: r.get(c)} for r in prefix])]
    where = f" column {columns[0]!r}" if columns else ""
    return f"{row_names(high - 1)},{where}: value types differ from the rows before it"


def _rows_to_dataset(rows: list[dict], row_names: RowNamer) -> datasets.Dataset:
    """Build a Dataset from JSON objects; an Arrow type conflict becomes a ValueError naming
    the first row (and column) that causes it."""
    try:
        return datasets.Dataset.from_list(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as error:
        if _arrow_accepts(rows):  # not a type clash between rows
            raise ValueError(f"{row_names(0)} onwards: cannot build a dataset ({error})") from None
        raise ValueError(_schema_conflict(rows, row_names)) from None


def _read_json_lines(path: Path) -> tuple[datasets.Dataset, RowNames]:
    rows, line_numbers = [], []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue  # blank lines (often a trailing newline) are not rows
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {line_number}: not valid JSON "
                                 f"({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {line_number}: expected a JSON object, "
                                 f"got {type(row).__name__}")
            rows.append(row)
            line_numbers.append(line_number)
    if not rows:
        raise ValueError(f"{path}: no rows")
    row_names = RowNames(str(path), tuple(line_numbers))
    return _rows_to_dataset(rows, row_names), row_names


def _read_json(path: Path) -> tuple[datasets.Dataset, RowNames]:
    """A .json file is a list of row objects, a dict of equal-length columns, or (as on the
    HF Hub) JSON Lines under a .json name."""
    text = path.read_text(encoding="utf-8")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several top-level values: JSON Lines
            return _read_json_lines(path)
        raise ValueError(f"{path} line {error.lineno}: not valid JSON ({error.msg})") from None
    if isinstance(payload, dict) and payload and all(isinstance(v, list) for v in payload.values()):
        lengths = {len(v) for v in payload.values()}
        if len(lengths) != 1:
            raise ValueError(f"{path}: column lists have different lengths {sorted(lengths)}")
        payload = [dict(zip(payload, values)) for values in zip(*payload.values())]
    if not isinstance(payload, list):
        raise ValueError(f"{path}: expected a JSON list of row objects or a dict of columns")
    for index, row in enumerate(payload):
        if not isinstance(row, dict):
            raise ValueError(f"{path} row {index}: expected a JSON object, "
                             f"got {type(row).__name__}")
    if not payload:
        raise ValueError(f"{path}: no rows")
    return _rows_to_dataset(payload, RowNames(str(path))), RowNames(str(path))


def _read_parquet(path: Path) -> tuple[datasets.Dataset, RowNames]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise ValueError(f"{path}: not a readable Parquet file ({error})") from None
    if table.num_rows == 0:
        raise ValueError(f"{path}: no rows")
    return datasets.Dataset(table), RowNames(str(path))


def _read_saved_dataset(path: Path, split: str | None) -> tuple[datasets.Dataset, RowNames]:
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise ValueError(f"{path}: not a dataset saved with save_to_disk ({error})") from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None:
            if len(splits) != 1:
                raise ValueError(f"{path} holds splits {splits}: choose one with --split")
            split = splits[0]
        if split not in loaded:
            raise ValueError(f"{path} has no split {split!r} (splits: {splits})")
        loaded = loaded[split]
        source = f"{path}[{split}]"
    else:
        if split is not None:
            raise ValueError(f"{path} is a single dataset without splits; drop --split {split}")
        source = str(path)
    if len(loaded) == 0:
        raise ValueError(f"{source}: no rows")
    return loaded, RowNames(source)


def load_rows(path: str | os.PathLike,
              split: str | None = None) -> tuple[datasets.Dataset, RowNames]:
    """Load preference data from `path`.

    Args:
        path: a .jsonl, .json or .parquet file, or a directory written by
            `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
        split: which split of a saved `DatasetDict` to use (needed when it has several).
    Returns:
        `(dataset, row_names)`: the rows, every column kept, and a callable naming row i for
        error messages (`file line N` for JSON Lines, `file row i` otherwise).
    Raises:
        FileNotFoundError if `path` does not exist; ValueError if it is not the format its
        name claims, is empty, or its rows do not share one schema.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        return _read_saved_dataset(path, split)
    if split is not None:
        raise ValueError(f"--split applies to saved datasets (directories), not to {path}")
    readers = {".jsonl": _read_json_lines, ".json": _read_json, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unsupported format; use one of {', '.join(FILE_FORMATS)} "
                         "or a saved dataset directory")
    try:
        return reader(path)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not a UTF-8 text file ({error.reason})") from None
    except PermissionError as error:
        raise ValueError(f"{path}: cannot read ({error.strerror})") from None


def output_kind(path: str | os.PathLike) -> str:
    """What `save_rows` writes to `path`: 'jsonl', 'json', 'parquet' or 'dataset' (a
    directory, for a path with no suffix or an existing directory)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in FILE_FORMATS:
        return suffix[1:]
    if path.is_dir() or suffix == "":
        return "dataset"
    raise ValueError(f"{path}: unsupported output format {suffix!r}; use one of "
                     f"{', '.join(FILE_FORMATS)} or a directory")


def _write_json_lines(dataset: datasets.Dataset, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in dataset:
            handle.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")


def _write_json(dataset: datasets.Dataset, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(dataset.to_list(), handle, ensure_ascii=False, allow_nan=False, indent=1)


def save_rows(dataset: datasets.Dataset, path: str | os.PathLike) -> str:
    """Write `dataset` to `path` atomically, in the format `path`'s extension names.

    Args:
        dataset: the rows to write (every column is written).
        path: `.jsonl` (JSON Lines), `.json` (a JSON list of rows), `.parquet`, or a directory
            (`Dataset.save_to_disk`). Missing parent directories are created.
    Returns:
        The kind written ('jsonl', 'json', 'parquet' or 'dataset').
    The data is written to a temporary path beside `path` and moved into place with
    `os.replace`; on any error the temporary data is removed and `path` is left as it was.
    """
    path = Path(path)
    kind = output_kind(path)
    try:
        _write_atomically(dataset, path, kind)
    except OSError as error:  # permissions, a full disk: the user's to fix, not a crash
        raise ValueError(f"{path}: cannot write ({error.strerror or error})") from None
    return kind


def _write_atomically(dataset: datasets.Dataset, path: Path, kind: str) -> None:
    with atomic_output(path, directory=kind == "dataset") as staged:
        if kind == "dataset":
            dataset.save_to_disk(str(staged))  # applies an indices mapping itself
        elif kind == "jsonl":
            _write_json_lines(dataset, staged)
        elif kind == "json":
            _write_json(dataset, staged)
        else:
            dataset.to_parquet(str(staged))
