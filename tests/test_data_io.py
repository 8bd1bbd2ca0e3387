"""mixpo.data.io: every input format, atomic output, and the errors for malformed files."""
import json
import math
import os
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mixpo.data import io as io_module
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


def test_failed_write_leaves_previous_output(tmp_path, rows, monkeypatch):
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")

    def fail_midway(dataset, path):
        with open(path, "w") as handle:
            handle.write('{"partial": ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io_module, "_write_json_lines", fail_midway)
    with pytest.raises(ValueError, match="out.jsonl: cannot write .No space left on device"):
        save_rows(datasets.Dataset.from_list(rows), out)
    assert out.read_text() == "previous\n"
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_json_outputs_refuse_columns_json_cannot_hold_before_writing(tmp_path, rows):
    images = datasets.Dataset.from_list(
        [dict(r, image={"bytes": b"\x89PNG", "path": "a.png"}) for r in rows])
    (tmp_path / "out.jsonl").write_text("previous\n")
    for suffix in (".jsonl", ".json"):
        with pytest.raises(ValueError, match=rf"out{suffix}: column 'image.bytes' holds binary "
                                             "values, which JSON cannot hold; write .parquet"):
            save_rows(images, tmp_path / f"out{suffix}")
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]
    assert (tmp_path / "out.jsonl").read_text() == "previous\n"
    assert save_rows(images, tmp_path / "images.parquet") == "parquet"
    assert load_rows(tmp_path / "images.parquet")[0][0]["image"]["bytes"] == b"\x89PNG"


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_nan_and_inf_are_kept_and_read_back_from_json(tmp_path, rows, suffix):
    """A column the run does not use is written as it came (Python json's NaN / Infinity
    literals, as the input held them), and reads back with load_rows and plain json."""
    dataset = datasets.Dataset.from_list(rows).add_column(
        "judge", [math.nan, math.inf, -math.inf] + [1.0] * (len(rows) - 3))
    out = tmp_path / f"out{suffix}"
    save_rows(dataset, out)
    judge = load_rows(out)[0]["judge"]
    assert math.isnan(judge[0]) and judge[1:3] == [math.inf, -math.inf] and judge[3] == 1.0
    text = out.read_text()
    assert "NaN" in text and "-Infinity" in text
    parsed = [json.loads(line) for line in text.splitlines()] if suffix == ".jsonl" else \
        json.loads(text)
    assert math.isnan(parsed[0]["judge"]) and parsed[1]["judge"] == math.inf


@pytest.mark.parametrize("value, shown", [
    (10 ** 30, "integer 1000000000000000000000000000000 does not fit in 64 bits; write it as "
               "a float (1e+30)"),
    (-(10 ** 400), "integer -100000000... (402 digits) does not fit in 64 bits; it is beyond "
                   "the float range too"),
])
@pytest.mark.parametrize("others", ["floats", "ints"])
def test_integer_beyond_64_bits_names_row_and_column(tmp_path, rows, value, shown, others):
    rows = [dict(r, score_chosen=r["score_chosen"] if others == "floats" else
                 int(r["score_chosen"])) for r in rows]
    rows[2]["score_chosen"] = value
    write_jsonl(tmp_path / "big.jsonl", rows)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path))}/big.jsonl line 3, column "
                                         rf"'score_chosen': {re.escape(shown)}"):
        load_rows(tmp_path / "big.jsonl")
    (tmp_path / "big.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"big.json row 2, column 'score_chosen': integer "):
        load_rows(tmp_path / "big.json")
    raw = raw_completion_rows()
    raw[1]["completions"][2]["overall_score"] = value  # nested, in `mixpo data pairs` input
    write_jsonl(tmp_path / "raw.jsonl", raw)
    with pytest.raises(ValueError, match=r"raw.jsonl line 2, column "
                                         r"'completions\[2\].overall_score': integer "):
        load_rows(tmp_path / "raw.jsonl")


def test_a_string_among_numbers_names_both_kinds(tmp_path, rows):
    rows[3]["score_chosen"] = "4.5"
    write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(ValueError, match=r"s.jsonl line 4, column 'score_chosen': a string "
                                         r"\('4.5'\) where the rows before it have a number$"):
        load_rows(tmp_path / "s.jsonl")


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
    with pytest.raises(ValueError, match="mixed.jsonl line 3, column 'chosen': a list where the "
                                         "rows before it have a string"):
        load_rows(tmp_path / "mixed.jsonl")
    rows = raw_completion_rows()
    rows[2]["completions"][1]["overall_score"] = "high"  # a string among numbers, nested
    write_jsonl(tmp_path / "raw.jsonl", rows)
    with pytest.raises(ValueError, match="raw.jsonl line 3, column 'completions': value types"):
        load_rows(tmp_path / "raw.jsonl")
    with pytest.raises(ValueError, match="--split applies to saved datasets"):
        load_rows(tmp_path / "mixed.jsonl", split="train")
