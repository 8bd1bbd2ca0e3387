"""mixpo.data.io: every input format, atomic output, and the errors for malformed files."""
import json
import os

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mixpo.data.io import load_rows, output_kind, save_rows
from fixtures import argilla_rows, raw_completion_rows, ultrafeedback_rows, write_jsonl


@pytest.fixture
def rows():
    return ultrafeedback_rows(6)


def test_jsonl_keeps_columns_and_names_lines(tmp_path, rows):
    path = tmp_path / "uf.jsonl"
    path.write_text("".join(json.dumps(r) + "\n\n" for r in rows))  # blank lines between rows
    dataset, row_names = load_rows(path)
    assert dataset.column_names == list(rows[0])
    assert dataset.to_list() == rows
    assert row_names(2) == f"{path} line 5"


@pytest.mark.parametrize("layout", ["list", "columns", "lines"])
def test_json_layouts(tmp_path, rows, layout):
    path = tmp_path / "data.json"
    if layout == "list":
        path.write_text(json.dumps(rows))
    elif layout == "columns":
        path.write_text(json.dumps({key: [r[key] for r in rows] for key in rows[0]}))
    else:  # HF Hub style: JSON Lines under a .json name
        write_jsonl(path, rows)
    dataset, row_names = load_rows(path)
    assert dataset.to_list() == rows
    assert row_names(3).endswith(("row 3", "line 4"))


def test_parquet_and_saved_dataset(tmp_path, rows):
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "uf.parquet")
    dataset, row_names = load_rows(tmp_path / "uf.parquet")
    assert dataset.to_list() == rows and row_names(1) == f"{tmp_path / 'uf.parquet'} row 1"

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    assert load_rows(tmp_path / "single")[0].to_list() == rows

    splits = datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows),
                                   "test_prefs": datasets.Dataset.from_list(rows[:2])})
    splits.save_to_disk(str(tmp_path / "dict"))
    dataset, row_names = load_rows(tmp_path / "dict", split="test_prefs")
    assert len(dataset) == 2 and "[test_prefs] row 0" in row_names(0)
    with pytest.raises(ValueError, match="choose one with --split"):
        load_rows(tmp_path / "dict")
    with pytest.raises(ValueError, match="no split 'train'"):
        load_rows(tmp_path / "dict", split="train")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ""])
def test_save_round_trip(tmp_path, suffix):
    rows = argilla_rows(5)
    dataset = datasets.Dataset.from_list(rows).select([4, 2, 0])  # an indices mapping
    out = tmp_path / "nested" / f"out{suffix}"
    kind = save_rows(dataset, out)
    assert kind == (suffix[1:] or "dataset")
    assert load_rows(out)[0].to_list() == [rows[4], rows[2], rows[0]]
    assert os.listdir(out.parent) == [out.name]  # no temporary files left behind


def test_save_replaces_existing_outputs(tmp_path, rows):
    first, second = datasets.Dataset.from_list(rows), datasets.Dataset.from_list(rows[:1])
    for out in (tmp_path / "out.jsonl", tmp_path / "outdir"):
        save_rows(first, out)
        save_rows(second, out)
        assert load_rows(out)[0].to_list() == rows[:1]
    loaded, _ = load_rows(tmp_path / "outdir")  # memory-mapped from the directory it replaces
    save_rows(loaded.add_column("n", [1]), tmp_path / "outdir")
    assert load_rows(tmp_path / "outdir")[0].to_list() == [dict(rows[0], n=1)]
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "outdir"]


def test_failed_write_leaves_previous_output(tmp_path, rows):
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    bad = datasets.Dataset.from_list([{"score": float("nan")}])  # JSON cannot hold NaN
    with pytest.raises(ValueError):
        save_rows(bad, out)
    assert out.read_text() == "previous\n"
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_output_kind(tmp_path):
    assert output_kind(tmp_path / "a.PARQUET") == "parquet"
    assert output_kind(tmp_path / "dir") == "dataset"
    with pytest.raises(ValueError, match="unsupported output format '.csv'"):
        output_kind(tmp_path / "a.csv")


def test_bad_jsonl_names_line(tmp_path, rows):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl line 2: not valid JSON"):
        load_rows(path)
    path.write_text(json.dumps(rows[0]) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"line 2: expected a JSON object, got list"):
        load_rows(path)


def test_not_the_claimed_format(tmp_path, rows):
    (tmp_path / "fake.parquet").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match="fake.parquet: not a readable Parquet file"):
        load_rows(tmp_path / "fake.parquet")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "fake.jsonl")
    with pytest.raises(ValueError, match="fake.jsonl"):
        load_rows(tmp_path / "fake.jsonl")
    (tmp_path / "broken.json").write_text('[{"a": 1},\n {"a": }]')
    with pytest.raises(ValueError, match="broken.json line 2: not valid JSON"):
        load_rows(tmp_path / "broken.json")
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unsupported format"):
        load_rows(tmp_path / "data.csv")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a dataset saved with save_to_disk"):
        load_rows(tmp_path / "plain")


def test_empty_missing_and_inconsistent(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no rows"):
        load_rows(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError):
        load_rows(tmp_path / "missing.jsonl")
    write_jsonl(tmp_path / "mixed.jsonl",
                [{"chosen": "a"}, {"chosen": "b"}, {"chosen": [{"role": "user"}]}])
    with pytest.raises(ValueError, match="mixed.jsonl line 3, column 'chosen': value types differ"):
        load_rows(tmp_path / "mixed.jsonl")
    rows = raw_completion_rows()
    rows[2]["completions"][1]["overall_score"] = "high"  # a string among numbers, nested
    write_jsonl(tmp_path / "raw.jsonl", rows)
    with pytest.raises(ValueError, match="raw.jsonl line 3, column 'completions': value types"):
        load_rows(tmp_path / "raw.jsonl")
    with pytest.raises(ValueError, match="--split applies to saved datasets"):
        load_rows(tmp_path / "mixed.jsonl", split="train")
