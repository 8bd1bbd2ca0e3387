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

from mixpo.files import atomic_output, check_replaceable, check_writable

OWNER = "mixpo data"  # the writer recorded in a save_to_disk output when the caller names none

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


# What Arrow raises for JSON values it cannot hold as one typed table (OverflowError: an
# integer column with a value past 64 bits).
ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError)
INT64_RANGE = (-2 ** 63, 2 ** 63)


def _arrow_accepts(rows: list[dict]) -> bool:
    try:
        pa.Table.from_pylist(rows)
    except ARROW_ERRORS:
        return False
    return True


def _oversized_integer(value, path: str) -> tuple[str, int] | None:
    """(where inside the value, the integer) of the first int outside int64 in `value`
    (nested lists and objects included), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if INT64_RANGE[0] <= value < INT64_RANGE[1] else (path, value)
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _oversized_integer(item, f"{path}[{key}]" if isinstance(key, int)
                                   else f"{path}.{key}")
        if found:
            return found
    return None


def _integer_overflow(rows: list[dict], row_names: RowNamer) -> str | None:
    """Name the first row and column holding an integer Arrow cannot store (beyond 64 bits,
    such as 10**30 written without a decimal point), or None."""
    for index, row in enumerate(rows):
        for column, value in row.items():
            found = _oversized_integer(value, column)
            if found:
                where, number = found
                digits = str(number)
                shown = digits if len(digits) <= 40 else f"{digits[:10]}... ({len(digits)} digits)"
                try:
                    hint = f"write it as a float ({float(number):g}) if that is the value meant"
                except OverflowError:
                    hint = "it is beyond the float range too"
                return (f"{row_names(index)}, column {where!r}: integer {shown} does not fit "
                        f"in 64 bits; {hint}")
    return None


def _kind(value) -> str:
    """A JSON value's kind, for messages: 'a string', 'a number', 'a list', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "a list" if isinstance(value, list) else \
        "an object" if isinstance(value, dict) else type(value).__name__


def _schema_conflict(rows: list[dict], row_names: RowNamer) -> str:
    """Name the first row (and column) whose value types clash with the rows before it, and
    the two kinds of value: bisect for the shortest prefix Arrow cannot hold as one table."""
    low, high = 1, len(rows)  # invariant: rows[:high] is rejected, rows[:low - 1] accepted
    while low < high:
        middle = (low + high) // 2
        if _arrow_accepts(rows[:middle]):
            low = middle + 1
        else:
            high = middle
    prefix = rows[:high]
    columns = [c for c in rows[high - 1] if not _arrow_accepts([{c: r.get(c)} for r in prefix])]
    if not columns:
        return f"{row_names(high - 1)}: value types differ from the rows before it"
    column = columns[0]
    value = rows[high - 1][column]
    before = sorted({_kind(r.get(column)) for r in prefix[:-1]} - {"null", _kind(value)})
    shown = f" ({value!r})" if isinstance(value, (str, int, float)) and len(repr(value)) <= 40 \
        else ""
    detail = (f"{_kind(value)}{shown} where the rows before it have {' or '.join(before)}"
              if before else "value types differ from the rows before it")
    return f"{row_names(high - 1)}, column {column!r}: {detail}"


def _rows_to_dataset(rows: list[dict], row_names: RowNamer) -> datasets.Dataset:
    """Build a Dataset from JSON objects; an integer Arrow cannot store or an Arrow type
    conflict becomes a ValueError naming the first row and column that causes it."""
    try:
        return datasets.Dataset.from_list(rows)
    except ARROW_ERRORS as error:
        overflow = _integer_overflow(rows, row_names)
        if overflow:
            raise ValueError(overflow) from None
        if _arrow_accepts(rows):  # not a type clash between rows
            raise ValueError(f"{row_names(0)} onwards: cannot build a dataset ({error})") from None
        raise ValueError(_schema_conflict(rows, row_names)) from None


def _utf8(raw: bytes, where: str) -> str:
    """`raw` decoded; ValueError naming `where` and the column of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{where}, column {error.start + 1}: not UTF-8 text (byte "
                         f"0x{raw[error.start]:02x}: {error.reason}); re-save the file as "
                         "UTF-8") from None


def _read_json_lines(path: Path) -> tuple[datasets.Dataset, RowNames]:
    rows, line_numbers = [], []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            line = _utf8(raw, f"{path} line {line_number}")
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
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        _utf8(raw.split(b"\n")[line - 1], f"{path} line {line}")   # raises: the bad line
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
    try:
        return datasets.Dataset(table), RowNames(str(path))
    except (TypeError, ValueError, NotImplementedError) as error:
        for field in table.schema:
            if _has_map(field.type):
                raise ValueError(f"{path}, column {field.name!r}: a Parquet map "
                                 f"({field.type}), which datasets cannot hold; store it as a "
                                 "list of key/value structs or drop the column") from None
        raise ValueError(f"{path}: cannot build a dataset ({error})") from None


def _has_map(arrow_type: pa.DataType) -> bool:
    if pa.types.is_map(arrow_type):
        return True
    if pa.types.is_struct(arrow_type):
        return any(_has_map(field.type) for field in arrow_type)
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or \
            pa.types.is_fixed_size_list(arrow_type):
        return _has_map(arrow_type.value_type)
    return False


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


# NaN and +-inf are written as the literals NaN / Infinity / -Infinity (Python's json, as
# the input that held them): every column is kept as it was, even one the run does not use
# (a NaN rating beside the reward scores a run is prepared on), and the file reads back with
# load_rows, datasets' JSON loader, pandas and pyarrow (strict parsers such as jq refuse
# it). The columns mixpo computes (difficulty, rewards, losses) are checked finite.
def _write_json_lines(dataset: datasets.Dataset, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in dataset:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_json(dataset: datasets.Dataset, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(dataset.to_list(), handle, ensure_ascii=False, indent=1)


def _json_unwritable(arrow_type: pa.DataType, where: str) -> tuple[str, pa.DataType] | None:
    """(column path, type) of the first part of `arrow_type` JSON has no value for (binary
    data such as images, dates and times, decimals), or None."""
    if pa.types.is_struct(arrow_type):
        parts = [(f"{where}.{field.name}", field.type) for field in arrow_type]
    elif pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or \
            pa.types.is_fixed_size_list(arrow_type):
        parts = [(f"{where}[]", arrow_type.value_type)]
    elif pa.types.is_map(arrow_type):
        parts = [(f"{where}{{}}", arrow_type.key_type), (f"{where}{{}}", arrow_type.item_type)]
    elif (pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)
          or pa.types.is_fixed_size_binary(arrow_type) or pa.types.is_temporal(arrow_type)
          or pa.types.is_decimal(arrow_type)):
        return where, arrow_type
    else:
        return None
    for part, part_type in parts:
        found = _json_unwritable(part_type, part)
        if found:
            return found
    return None


def check_output(dataset: datasets.Dataset, path: str | os.PathLike,
                 owner: str = OWNER) -> str:
    """The kind `save_rows` would write `dataset` to `path` as (`output_kind`); ValueError,
    before any work is done, for an unsupported output name, a column a JSON output cannot
    hold (binary data, dates and times, decimals: write .parquet or a directory instead), or
    an existing directory `owner` did not write (`mixpo.files.check_replaceable`)."""
    kind = output_kind(path)
    if kind == "dataset":
        check_replaceable(path, owner)
    elif Path(path).is_dir():
        raise ValueError(f"{path} is a directory; give a file name for a {kind} output")
    check_writable(path)
    if kind in ("jsonl", "json"):
        for field in dataset.data.schema:
            found = _json_unwritable(field.type, field.name)
            if found:
                raise ValueError(f"{path}: column {found[0]!r} holds {found[1]} values, which "
                                 f"JSON cannot hold; write .parquet or a directory instead")
    return kind


def save_rows(dataset: datasets.Dataset, path: str | os.PathLike, owner: str = OWNER) -> str:
    """Write `dataset` to `path` atomically, in the format `path`'s extension names.

    Args:
        dataset: the rows to write (every column is written).
        path: `.jsonl` (JSON Lines), `.json` (a JSON list of rows), `.parquet`, or a directory
            (`Dataset.save_to_disk`). Missing parent directories are created.
        owner: the command writing it (recorded in a directory output; an existing directory
            is replaced only if the same command wrote it).
    Returns:
        The kind written ('jsonl', 'json', 'parquet' or 'dataset').
    Raises:
        ValueError for an unsupported output or a column JSON cannot hold (`check_output`),
        and when the output cannot be written (permissions, a full disk).
    NaN and +-inf are written to JSON as NaN / Infinity / -Infinity (see `_write_json_lines`).
    The data is written to a temporary path beside `path` and moved into place with
    `os.replace`; on any error the temporary data is removed and `path` is left as it was.
    """
    path = Path(path)
    kind = check_output(dataset, path, owner)
    try:
        _write_atomically(dataset, path, kind, owner)
    except OSError as error:  # permissions, a full disk: the user's to fix, not a crash
        raise ValueError(f"{path}: cannot write ({error.strerror or error})") from None
    return kind


def _write_atomically(dataset: datasets.Dataset, path: Path, kind: str, owner: str) -> None:
    with atomic_output(path, directory=kind == "dataset", owner=owner) as staged:
        if kind == "dataset":
            dataset.save_to_disk(str(staged))  # applies an indices mapping itself
        elif kind == "jsonl":
            _write_json_lines(dataset, staged)
        elif kind == "json":
            _write_json(dataset, staged)
        else:
            dataset.to_parquet(str(staged))
