"""mixpo.data.formats: layouts, the (prompt, chosen, rejected) view, scores, rendering."""
import math

import datasets
import numpy as np
import pytest

from mixpo.data.formats import (check_preference_rows, check_score, detect_format,
                                read_column_scores, render_example, resolve_score_columns,
                                split_example)
from fixtures import (argilla_rows, build_tiny_tokenizer, corpus_texts, raw_completion_rows,
                           ultrafeedback_rows)

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
    for value, message in ((None, "missing score"), (math.nan, "score is nan"),
                           ("7", "score '7' is not a number"),
                           (True, "score True is not a number")):
        with pytest.raises(ValueError, match=f"row 4, column 'score_chosen': {message}"):
            check_score(value, "row 4", "score_chosen")
    rows = ultrafeedback_rows(4)
    rows[2]["score_rejected"] = None
    dataset = datasets.Dataset.from_list(rows)
    with pytest.raises(ValueError, match="row 2, column 'score_rejected': missing score"):
        read_column_scores(dataset, "score_rejected")
    assert read_column_scores(dataset, "score_chosen").dtype == np.float64


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
    prompt, chosen, _ = render_example(example, plain)
    assert prompt == f"user: {rows[0]['prompt']}\nassistant: "
    assert chosen == rows[0]["chosen"][1]["content"] + "</s>"
    standard = split_example({"prompt": "p ", "chosen": "a", "rejected": "b"})
    assert render_example(standard, plain) == ("p ", "a</s>", "b</s>")
