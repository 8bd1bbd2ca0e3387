"""mixpo.data.tokenize: rendering, masking, EOS/BOS, truncation, errors, carried columns."""
import pytest

from mixpo.data.tokenize import IGNORE_INDEX, tokenize_pair, tokenize_rows
from fixtures import build_tiny_tokenizer, corpus_texts, ultrafeedback_rows


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(["the cat sat on the mat", "why is the sky blue"])


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def as_lists(tokenized):
    """Token arrays (int32 numpy) as lists, for readable comparisons."""
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in tokenized.items()}


def test_plain_rows_mask_the_prompt_and_append_eos(tokenizer):
    row = {"prompt": "why is the sky", "chosen": "blue", "rejected": "the cat sat",
           "score_chosen": 8.0, "score_rejected": 3.0, "hard": False, "extra": "dropped"}
    out = as_lists(tokenize_pair(row, tokenizer, max_length=32))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompt = [bos] + ids(tokenizer, "why is the sky")  # this tokenizer adds <s> by default
    assert out["prompt_length"] == len(prompt)
    assert out["chosen_input_ids"] == prompt + ids(tokenizer, "blue") + [eos]
    assert out["rejected_input_ids"] == prompt + ids(tokenizer, "the cat sat") + [eos]
    assert out["chosen_labels"] == [IGNORE_INDEX] * len(prompt) + ids(tokenizer, "blue") + [eos]
    assert out["rejected_labels"][len(prompt):] == out["rejected_input_ids"][len(prompt):]
    assert (out["score_chosen"], out["score_rejected"], out["hard"]) == (8.0, 3.0, False)
    assert "extra" not in out
    # A completion that already ends with EOS gets no second one (TRL appends it if missing).
    ended = dict(row, chosen="blue" + tokenizer.eos_token)
    assert as_lists(tokenize_pair(ended, tokenizer, max_length=32))["chosen_input_ids"] == \
        out["chosen_input_ids"]


def test_conversational_rows_use_the_chat_template_and_never_double_eos(tokenizer):
    prompt = [{"role": "user", "content": "why is the sky blue"}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "the sun"}],
           "rejected": [{"role": "assistant", "content": "the cat"}]}
    out = as_lists(tokenize_pair(row, tokenizer, max_length=64))
    templated_prompt = tokenizer.apply_chat_template(prompt, tokenize=False,
                                                     add_generation_prompt=True)
    prompt_ids = [tokenizer.bos_token_id] + ids(tokenizer, templated_prompt)
    assert out["chosen_input_ids"][:len(prompt_ids)] == prompt_ids
    completion = out["chosen_input_ids"][len(prompt_ids):]
    # The template closes the turn with </s> (= EOS here): it must not be appended twice.
    assert completion == ids(tokenizer, "the sun </s>")
    assert completion.count(tokenizer.eos_token_id) == 1
    assert out["chosen_labels"][:len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)


def test_truncation_keeps_the_prompt_end_then_cuts_completions(tokenizer):
    prompt_words = "the cat sat on the mat why is the sky blue"
    row = {"prompt": prompt_words, "chosen": "the cat sat on the mat", "rejected": "blue"}
    out = as_lists(tokenize_pair(row, tokenizer, max_length=8, max_prompt_length=4))
    assert out["prompt_length"] == 4
    assert out["chosen_input_ids"][:4] == ids(tokenizer, "is the sky blue")  # the end survives
    assert len(out["chosen_input_ids"]) == 8  # completion cut to max_length - prompt
    assert out["chosen_input_ids"][4:] == ids(tokenizer, "the cat sat on")
    assert out["rejected_input_ids"][4:] == ids(tokenizer, "blue") + [tokenizer.eos_token_id]
    # Short enough: nothing is cut, even with a small max_prompt_length.
    short = tokenize_pair({"prompt": "why is the sky", "chosen": "blue", "rejected": "the"},
                          tokenizer, max_length=64, max_prompt_length=2)
    assert short["chosen_input_ids"].dtype.name == "int32"
    assert short["prompt_length"] == 5


def test_a_prompt_filling_max_length_is_an_error_naming_the_row(tokenizer):
    rows = [{"prompt": "why", "chosen": "blue", "rejected": "the"},
            {"prompt": "the cat sat on the mat why is", "chosen": "blue", "rejected": "the"}]
    with pytest.raises(ValueError, match=r"row 1: the prompt has 9 tokens"):
        tokenize_rows(rows, tokenizer, max_length=6, max_prompt_length=None)
    with pytest.raises(ValueError, match="data.jsonl line 4, column 'chosen'"):
        tokenize_rows([{"prompt": "why", "chosen": " ", "rejected": "x"}], tokenizer, 16,
                      row_names=lambda i: "data.jsonl line 4")


def test_truncated_pairs_are_counted_in_one_warning(tmp_path):
    from mixpo.data.formats import DataWarning
    from mixpo.data.tokenize import tokenize_rows

    rows = ultrafeedback_rows(6)
    rows[4]["chosen"][1]["content"] = " ".join(["word"] * 400)
    tokenizer = build_tiny_tokenizer(corpus_texts(rows) + ["word"])
    with pytest.warns(DataWarning, match=r"1 of 6 pairs were longer than max_length=64 tokens "
                                         r"and were truncated \(the longest, row 4, had \d+\)"):
        examples = tokenize_rows(rows, tokenizer, max_length=64)
    assert max(len(e["chosen_input_ids"]) for e in examples) == 64
    assert not any("truncated_from" in example for example in examples)
