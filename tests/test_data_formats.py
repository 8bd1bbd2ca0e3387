"""mixpo.data.formats: layouts, the (prompt, chosen, rejected) view, scores, rendering."""
import math

import datasets
import numpy as np
import pytest

from mixpo.data.formats import (check_preference_rows, check_score, detect_format,
                                read_column_scores, render_example, resolve_score_columns,
                                row_warnings, split_example)
from mixpo.data.io import RowNames, load_rows
from fixtures import (argilla_rows, build_tiny_tokenizer, corpus_texts, raw_completion_rows,
                           ultrafeedback_rows, write_jsonl)

USER = {"role": "user", "content": "why is the sky blue"}
GOOD = {"role": "assistant", "content": "light scatters"}
BAD = {"role": "assistant", "content": "no"}


def test_detect_format():
    assert detect_format(datasets.Dataset.from_list(ultrafeedback_rows(3))) == "implicit-prompt"
    assert detect_format(datasets.Dataset.from_list(argilla_rows(3))) == "implicit-prompt"
    assert detect_format(datasets.Dataset.from_list(raw_completion_rows())) == "raw-completions"
    standard = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    assert detect_format(datasets.Dataset.from_list(standard)) == "standard"
    conversational = [{"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]}]
    assert detect_format(datasets.Dataset.from_list(conversational)) == "conversational"
    with pytest.raises(ValueError, match="no chosen/rejected columns"):
        detect_format(datasets.Dataset.from_list([{"text": "x"}]))
    with pytest.raises(ValueError, match="need a 'prompt' column"):
        detect_format(datasets.Dataset.from_list([{"chosen": "a", "rejected": "b"}]))


def test_split_example_layouts():
    standard = split_example({"prompt": "p", "chosen": "a", "rejected": "b"})
    assert (standard.prompt, standard.chosen, standard.rejected) == ("p", "a", "b")
    assert not standard.conversational
    # UltraFeedback-binarized / argilla: whole conversations, the shared user turn is the prompt.
    implicit = split_example({"prompt": USER["content"], "chosen": [USER, GOOD],
                              "rejected": [USER, BAD]})
    assert implicit.prompt == [USER] and implicit.chosen == [GOOD] and implicit.rejected == [BAD]
    # Multi-turn: everything up to the last shared user turn.
    history = [USER, GOOD, {"role": "user", "content": "and at night"}]
    multi = split_example({"chosen": history + [GOOD], "rejected": history + [BAD]})
    assert multi.prompt == history and multi.chosen == [GOOD]
    # TRL conversational: completion-only messages, prompt as a string or messages.
    for prompt in (USER["content"], [USER]):
        explicit = split_example({"prompt": prompt, "chosen": [GOOD], "rejected": [BAD]})
        assert explicit.prompt == [USER] and explicit.conversational


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "column 'chosen': empty completion"),
    ({"prompt": "p", "chosen": "a", "rejected": "  "}, "column 'rejected': empty completion"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "column 'prompt': empty prompt"),
    ({"prompt": "p", "chosen": "a", "rejected": None}, "column 'rejected': expected a string"),
    ({"chosen": [USER, {"role": "assistant", "content": ""}], "rejected": [USER, BAD]},
     "column 'chosen': empty completion"),
    ({"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "other"}, BAD]},
     "no shared prompt messages"),
    ({"chosen": [USER, GOOD], "rejected": []},
     "column 'rejected': expected a non-empty message list"),
    ({"chosen": [USER, {"role": "assistant"}], "rejected": [USER, BAD]},
     "need string 'role' and 'content'"),
])
def test_split_example_errors_name_row_and_column(row, message):
    with pytest.raises(ValueError, match=message) as error:
        split_example(row, "data.jsonl line 9")
    assert str(error.value).startswith("data.jsonl line 9, column")


def test_check_preference_rows_names_the_bad_row():
    rows = ultrafeedback_rows(5)
    rows[3]["rejected"][1]["content"] = ""
    dataset = datasets.Dataset.from_list(rows)
    with pytest.raises(ValueError, match=r"^line 4, column 'rejected': empty completion"):
        check_preference_rows(dataset, lambda i: f"line {i + 1}")
    with pytest.raises(ValueError, match="build pairs first"):
        check_preference_rows(datasets.Dataset.from_list(raw_completion_rows()))


def test_scores():
    assert check_score(np.float32(2.5), "row 0", "s") == 2.5
    assert check_score(10 ** 30, "row 0", "s") == 1e30  # an int within the float range
    for value, message in ((None, "missing score"), (math.nan, "score is nan"),
                           ("7", "score '7' is not a number: the column holds strings; "
                                 "convert it to numbers first$"),
                           (True, "score True is not a number$"),
                           (10 ** 400, "score \\(an integer of 401 digits\\) is beyond the "
                                       "float range")):
        with pytest.raises(ValueError, match=f"^row 4, column 'score_chosen': {message}"):
            check_score(value, "row 4", "score_chosen")
    rows = ultrafeedback_rows(4)
    rows[2]["score_rejected"] = None
    dataset = datasets.Dataset.from_list(rows)
    with pytest.raises(ValueError, match="row 2, column 'score_rejected': missing score"):
        read_column_scores(dataset, "score_rejected")
    assert read_column_scores(dataset, "score_chosen").dtype == np.float64


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_string_score_columns_are_refused_not_parsed(tmp_path, suffix):
    rows = [dict(r, score_chosen=str(r["score_chosen"]), score_rejected=str(r["score_rejected"]))
            for r in ultrafeedback_rows(4)]
    path = tmp_path / f"s{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    dataset, row_names = load_rows(path)
    where = "line 1" if suffix == ".jsonl" else "row 0"
    with pytest.raises(ValueError, match=rf"s{suffix} {where}, column 'score_chosen': score "
                                         rf"'{rows[0]['score_chosen']}' is not a number: the "
                                         "column holds strings"):
        read_column_scores(dataset, "score_chosen", row_names)


def test_row_warnings_count_identical_and_repeated_rows():
    rows = ultrafeedback_rows(6)
    rows[2] = dict(rows[2], rejected=rows[2]["chosen"])
    rows[4] = dict(rows[4], rejected=rows[4]["chosen"])
    rows += [rows[1], rows[2], rows[1]]  # rows 6 and 8 repeat row 1, row 7 repeats row 2
    dataset = datasets.Dataset.from_list(rows)
    names = RowNames("d.jsonl", tuple(range(1, 10)))
    same, repeated = row_warnings(dataset, names, batch_size=4)  # batches cut the repeats
    assert same.startswith("3 of 9 pairs have chosen == rejected (the first: d.jsonl line 3)")
    assert repeated == ("3 of 9 rows repeat an earlier row exactly (the first: d.jsonl line 7 "
                        "repeats d.jsonl line 2); each copy trains on its pair again")
    assert row_warnings(dataset, names, identical=False) == [repeated]
    # One differing column (the id) makes a row no repeat; every other row is clean.
    assert row_warnings(datasets.Dataset.from_list(ultrafeedback_rows(6))) == []
    assert row_warnings(datasets.Dataset.from_list(
        [dict(rows[1], prompt_id="other"), rows[1]])) == []
    assert row_warnings(datasets.Dataset.from_list(rows[:1]), RowNames("one.jsonl")) == [
        "one.jsonl has only 1 row: there is nothing to order, select or route"]


def test_resolve_score_columns():
    for pair in (("score_chosen", "score_rejected"), ("chosen_rating", "rejected_rating")):
        assert resolve_score_columns(["prompt", *pair]) == pair
    assert resolve_score_columns(["a", "b"], ["b", "a"]) == ("b", "a")
    with pytest.raises(ValueError, match=r"score column\(s\) \['c'\] not found"):
        resolve_score_columns(["a", "b"], ["a", "c"])
    with pytest.raises(ValueError, match="--score-columns CHOSEN REJECTED"):
        resolve_score_columns(["prompt", "chosen", "rejected"])


def test_render_example_with_and_without_chat_template():
    rows = ultrafeedback_rows(2)
    example = split_example(rows[0])
    tokenizer = build_tiny_tokenizer(corpus_texts(rows))
    prompt, chosen, rejected = render_example(example, tokenizer)
    full = tokenizer.apply_chat_template(rows[0]["chosen"], tokenize=False)
    assert prompt + chosen == full and prompt.endswith("assistant : ")
    assert rejected.startswith(rows[0]["rejected"][1]["content"])

    plain = build_tiny_tokenizer(corpus_texts(rows), chat_template=False)
    with pytest.raises(ValueError, match="conversational rows need a tokenizer with a chat "
                       "template.*TRL refuses"):
        render_example(example, plain)
    prompt, chosen, _ = render_example(example, plain, plain_conversations=True)
    assert prompt == f"user: {rows[0]['prompt']}\nassistant: "
    assert chosen == rows[0]["chosen"][1]["content"] + "</s>"
    standard = split_example({"prompt": "p ", "chosen": "a", "rejected": "b"})
    assert render_example(standard, plain) == ("p ", "a</s>", "b</s>")
