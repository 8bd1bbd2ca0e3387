"""Tokenize preference rows for training: prompt, chosen and rejected as token ids with
HF-style labels (label t = token t; prompt tokens = IGNORE_INDEX).

Rendering follows `mixpo.data.formats.render_example`: conversational rows go through the
tokenizer's chat template (the completion is the templated conversation minus the templated
prompt; a tokenizer without one is refused, as TRL does), everything else is plain
concatenation. Each part is tokenized without
special tokens, then, as TRL does, EOS is appended to each completion (not doubled when the
rendered completion already ends with it) and BOS is put in front of the prompt when the
tokenizer adds one by default and the rendered prompt does not already start with it.

Truncation (TRL's order): when prompt + longest completion exceeds `max_length`, the prompt
keeps its last `max_prompt_length` tokens; if still too long, both completions keep their
first `max_length - len(prompt)` tokens. A prompt that leaves no room for a single completion
token is an error naming the row.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from mixpo.data.formats import DataWarning, every_row, render_example, split_example
from mixpo.loss_spec import IGNORE_INDEX
from mixpo.data.io import RowNamer, default_row_names

# Per-pair columns carried through tokenization and collation (TRL drops them; we must not).
PASSTHROUGH_COLUMNS = ("hard", "score_chosen", "score_rejected", "difficulty",
                       "ref_chosen_logps", "ref_rejected_logps")


def adds_bos_by_default(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a plain `tokenizer(text)` encoding."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_pair(row: dict, tokenizer, max_length: int, max_prompt_length: int | None = None,
                  where: str = "row", add_bos: bool | None = None) -> dict:
    """One preference row -> token ids and HF-style labels for both completions.

    Args:
        row: a preference row (standard strings or message lists; see mixpo.data.formats).
        tokenizer: a Hugging Face tokenizer (fast or slow).
        max_length: the most tokens of prompt + completion.
        max_prompt_length: the most prompt tokens kept (its end) when truncation is needed;
            None = the prompt is never cut.
        where: names the row in error messages ("data.jsonl line 7").
        add_bos: put BOS in front of the prompt; None = `adds_bos_by_default(tokenizer)`.
    Returns a dict with `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`,
    `rejected_labels` (int32 numpy arrays, 4 bytes a token however large the dataset; labels
    are IGNORE_INDEX on prompt tokens), `prompt_length`, every PASSTHROUGH_COLUMNS entry
    the row has, and `truncated_from` (prompt + longest completion before truncation) when
    the pair was cut to `max_length`.
    """
    example = split_example(row, where)
    try:
        prompt_text, chosen_text, rejected_text = render_example(example, tokenizer)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    prompt = _encode(tokenizer, prompt_text)
    if add_bos is None:
        add_bos = adds_bos_by_default(tokenizer)
    if add_bos and prompt[:1] != [tokenizer.bos_token_id]:
        prompt = [tokenizer.bos_token_id] + prompt
    eos = tokenizer.eos_token_id
    completions = []
    for text in (chosen_text, rejected_text):
        ids = _encode(tokenizer, text)
        if eos is not None and ids[-1:] != [eos]:
            ids.append(eos)
        completions.append(ids)

    untruncated, truncated_from = len(prompt) + max(map(len, completions)), None
    if untruncated > max_length:
        if max_prompt_length is not None and len(prompt) > max_prompt_length:
            prompt = prompt[len(prompt) - max_prompt_length:]
        if len(prompt) >= max_length:
            raise ValueError(f"{where}: the prompt has {len(prompt)} tokens, which leaves no room "
                             f"for a completion within max_length={max_length}; raise max_length "
                             f"or set max_prompt_length below it")
        completions = [ids[:max_length - len(prompt)] for ids in completions]
        truncated_from = untruncated

    tokenized = {"prompt_length": len(prompt)}
    if truncated_from is not None:
        tokenized["truncated_from"] = truncated_from
    for name, ids in zip(("chosen", "rejected"), completions):
        tokenized[f"{name}_input_ids"] = np.asarray(prompt + ids, dtype=np.int32)
        tokenized[f"{name}_labels"] = np.asarray([IGNORE_INDEX] * len(prompt) + ids,
                                                 dtype=np.int32)
    for column in PASSTHROUGH_COLUMNS:
        if column in row and row[column] is not None:
            tokenized[column] = _checked_passthrough(row[column], column, where)
    return tokenized


def _checked_passthrough(value, column: str, where: str):
    """A per-pair column's value, type-checked: the routing flag must be a real boolean (a
    string "false" or a 2 would route the pair), the others finite numbers."""
    if column == "hard":
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        raise ValueError(f"{where}, column 'hard': routing flags must be true/false, "
                         f"got {value!r}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)) \
            or not np.isfinite(value):
        raise ValueError(f"{where}, column {column!r}: expected a finite number, got {value!r}")
    return float(value)


def tokenize_rows(rows: Sequence[dict], tokenizer, max_length: int,
                  max_prompt_length: int | None = None,
                  row_names: RowNamer = default_row_names) -> list[dict]:
    """`tokenize_pair` over every row (a datasets.Dataset or a list of dicts), in order; one
    ValueError names every bad row (`every_row`), one DataWarning counts the truncated pairs."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be positive or None, got {max_prompt_length}")
    add_bos = adds_bos_by_default(tokenizer)
    examples = every_row(enumerate(rows), lambda item: tokenize_pair(
        item[1], tokenizer, max_length, max_prompt_length, row_names(item[0]), add_bos))
    cut = [(example.pop("truncated_from"), index) for index, example in enumerate(examples)
           if "truncated_from" in example]
    if cut:
        longest, index = max(cut)
        warnings.warn(f"{len(cut)} of {len(examples)} pairs were longer than max_length="
                      f"{max_length} tokens and were truncated (the longest, {row_names(index)}, "
                      f"had {longest}); raise max_length to keep them whole", DataWarning,
                      stacklevel=2)
    return examples
