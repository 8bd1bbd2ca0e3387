"""Recognise the preference-data layouts people actually have, without rewriting them.

Layouts (TRL's names where TRL has one):
- `standard`: prompt / chosen / rejected as plain strings.
- `conversational`: chosen / rejected as message lists ([{"role", "content"}, ...]) holding
  only the completion, the prompt in a `prompt` column (string or message list).
- `implicit-prompt`: chosen / rejected are whole conversations whose shared leading messages
  are the prompt. UltraFeedback-binarized (`prompt` string plus full conversations and
  `score_chosen` / `score_rejected`) and argilla dpo-mix (`chosen_rating` /
  `rejected_rating`, no prompt column) are both of this kind.
- `raw-completions`: one prompt with several scored completions (UltraFeedback's raw
  `instruction` + `completions[{response, overall_score}]`); `mixpo.data.pairs` turns it
  into pairs.

Nothing here changes a row: `split_example` gives a uniform (prompt, chosen, rejected) view
of one row, used to validate rows and to render them for a tokenizer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import datasets
import numpy as np

from mixpo.data.io import RowNamer, default_row_names

# Rating columns of the common datasets, in the order they are looked for.
RATING_COLUMNS = (
    ("score_chosen", "score_rejected"),    # UltraFeedback-binarized (HuggingFaceH4, trl-lib)
    ("chosen_rating", "rejected_rating"),  # argilla dpo-mix-7k, distilabel datasets
    ("chosen_score", "rejected_score"),
)
REWARD_COLUMNS = ("reward_chosen", "reward_rejected")  # written by mixpo.scoring.reward
VALIDATION_LOSS_COLUMN = "validation_loss"              # written by mixpo.scoring.validation
EMBEDDING_DISTANCE_COLUMN = "embedding_distance"        # written by mixpo.scoring.embedding
SELECTED_EASIEST_COLUMN = "selected_easiest"            # tau, written by prepare --select-easiest
PROMPT_COLUMNS = ("prompt", "instruction")               # raw multi-completion rows
COMPLETIONS_COLUMN = "completions"


@dataclass(frozen=True)
class Example:
    """One preference pair seen uniformly.

    `prompt` is a string (standard rows) or a message list; `chosen` / `rejected` are the
    completions only: strings, or lists of messages that follow the prompt.
    """

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]

    @property
    def conversational(self) -> bool:
        return not isinstance(self.chosen, str)


def detect_format(dataset: datasets.Dataset) -> str:
    """Name the layout of `dataset`: 'standard', 'conversational', 'implicit-prompt' or
    'raw-completions' (see the module docstring); ValueError if it is none of them."""
    if len(dataset) == 0:
        raise ValueError("the dataset has no rows")
    columns = set(dataset.column_names)
    if COMPLETIONS_COLUMN in columns and not {"chosen", "rejected"} <= columns:
        return "raw-completions"
    if not {"chosen", "rejected"} <= columns:
        raise ValueError(f"no chosen/rejected columns (columns: {sorted(columns)}); expected "
                         "TRL preference rows or raw rows with a 'completions' column")
    first = dataset[0]["chosen"]
    if isinstance(first, str):
        if "prompt" not in columns:
            raise ValueError("string chosen/rejected need a 'prompt' column")
        return "standard"
    starts_with_prompt = bool(isinstance(first, list) and first and isinstance(first[0], dict)
                              and first[0].get("role") != "assistant")
    return "implicit-prompt" if starts_with_prompt or "prompt" not in columns else "conversational"


def resolve_score_columns(column_names: Sequence[str],
                          score_columns: Sequence[str] | None = None) -> tuple[str, str]:
    """The (chosen, rejected) rating columns: `score_columns` if given, else the first of
    RATING_COLUMNS present; ValueError naming the expected columns otherwise."""
    if score_columns is not None:
        if len(score_columns) != 2:
            raise ValueError("--score-columns takes two names (chosen, rejected), "
                             f"got {list(score_columns)}")
        missing = [name for name in score_columns if name not in column_names]
        if missing:
            raise ValueError(f"score column(s) {missing} not found (columns: {list(column_names)})")
        return score_columns[0], score_columns[1]
    for pair in RATING_COLUMNS:
        if pair[0] in column_names and pair[1] in column_names:
            return pair
    expected = " / ".join(f"{c}+{r}" for c, r in RATING_COLUMNS)
    raise ValueError(f"no rating columns ({expected}); name them with "
                     "--score-columns CHOSEN REJECTED")


def check_score(value: Any, where: str, column: str) -> float:
    """`value` as a finite float, or ValueError naming `where` and `column`."""
    if value is None:
        raise ValueError(f"{where}, column {column!r}: missing score")
    if isinstance(value, str):
        # As TRL: scores are numbers, never parsed from text ("4.5", "N/A", "4,5" ...).
        raise ValueError(f"{where}, column {column!r}: score {value!r} is not a number: the "
                         "column holds strings; convert it to numbers first")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{where}, column {column!r}: score {value!r} is not a number")
    try:
        number = float(value)
    except OverflowError:  # a Python int beyond the float range
        raise ValueError(f"{where}, column {column!r}: score (an integer of "
                         f"{len(str(abs(value)))} digits) is beyond the float range") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}, column {column!r}: score is {number}")
    return number


def check_finite_scores(values, places, what: str, hint: str = "") -> None:
    """ValueError at the first non-finite number of `values` (a computed score column),
    `places` (an iterable) naming where each goes: '{place}: {what} nan ({hint})'."""
    for place, value in zip(places, values):
        if not math.isfinite(value):
            raise ValueError(f"{place}: {what} {value}" + (f" ({hint})" if hint else ""))


def read_column_scores(dataset: datasets.Dataset, column: str,
                       row_names: RowNamer = default_row_names) -> np.ndarray:
    """Column `column` as float64 [n], every value checked with `check_score`."""
    if column not in dataset.column_names:
        raise ValueError(f"column {column!r} not found (columns: {dataset.column_names})")
    values = dataset[column]
    return np.array([check_score(v, row_names(i), column) for i, v in enumerate(values)],
                    dtype=np.float64)


def _check_messages(messages: Any, where: str, column: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}, column {column!r}: expected a non-empty message list")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}, column {column!r}: messages need string 'role' and "
                             f"'content', got {message!r}")
    return messages


def _check_completion(completion: Any, where: str, column: str) -> None:
    """A completion must contain some text: an empty answer teaches nothing and would make the
    loss see zero completion tokens."""
    if isinstance(completion, str):
        text = completion
    else:
        if any(message["role"] != "assistant" for message in completion):
            raise ValueError(f"{where}, column {column!r}: chosen and rejected do not share the "
                             "prompt messages (a non-assistant message differs)")
        text = "".join(message["content"] for message in completion)
    if not text.strip():
        raise ValueError(f"{where}, column {column!r}: empty completion")


def _shared_prefix_length(chosen: list[dict], rejected: list[dict]) -> int:
    length = 0
    for message_chosen, message_rejected in zip(chosen, rejected):
        if message_chosen != message_rejected:
            break
        length += 1
    return length


def split_example(row: dict, where: str = "row") -> Example:
    """The (prompt, chosen completion, rejected completion) view of one preference row.

    Implicit-prompt rows (whole conversations) are split at the end of the messages chosen and
    rejected share, as TRL's `extract_prompt` does; a `prompt` column is then only informative.
    Raises ValueError naming `where` and the column for a missing or empty prompt / chosen /
    rejected, or message lists that are not [{"role": str, "content": str}, ...].
    """
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, str) or isinstance(rejected, str):
        for column, value in (("prompt", row.get("prompt")), ("chosen", chosen),
                              ("rejected", rejected)):
            if not isinstance(value, str):
                raise ValueError(f"{where}, column {column!r}: expected a string, got {value!r}")
        if not row["prompt"].strip():
            raise ValueError(f"{where}, column 'prompt': empty prompt")
        example = Example(row["prompt"], chosen, rejected)
    else:
        chosen = _check_messages(chosen, where, "chosen")
        rejected = _check_messages(rejected, where, "rejected")
        if chosen[0]["role"] == "assistant":  # completion-only messages; prompt in its column
            prompt = row.get("prompt")
            if isinstance(prompt, str):
                if not prompt.strip():
                    raise ValueError(f"{where}, column 'prompt': empty prompt")
                prompt = [{"role": "user", "content": prompt}]
            else:
                prompt = _check_messages(prompt, where, "prompt")
            example = Example(prompt, chosen, rejected)
        else:
            shared = _shared_prefix_length(chosen, rejected)
            # The last shared message may itself be the (identical) assistant answer only
            # when one side continues; the prompt ends at the last non-assistant message.
            while shared > 0 and chosen[shared - 1]["role"] == "assistant":
                shared -= 1
            if shared == 0:
                raise ValueError(f"{where}, columns 'chosen'/'rejected': no shared prompt messages")
            example = Example(chosen[:shared], chosen[shared:], rejected[shared:])
    _check_completion(example.chosen, where, "chosen")
    _check_completion(example.rejected, where, "rejected")
    return example


MAX_ROW_ERRORS = 10  # bad rows named in one error message


def every_row(items: Iterable, check: Callable[[Any], Any]) -> list:
    """`[check(item) for item in items]`, but a ValueError stops only after every item was
    checked: one ValueError then names the bad rows (the first MAX_ROW_ERRORS of them) and
    how many there are, so a file is fixed in one pass, not one row per run."""
    results, errors, count = [], [], 0
    for item in items:
        try:
            results.append(check(item))
        except ValueError as error:
            count += 1
            if len(errors) < MAX_ROW_ERRORS:
                errors.append(str(error))
    if count == 1:
        raise ValueError(errors[0])
    if count:
        more = f"; and {count - len(errors)} more" if count > len(errors) else ""
        raise ValueError(f"{count} bad rows: {'; '.join(errors)}{more}")
    return results


def check_preference_rows(dataset: datasets.Dataset,
                          row_names: RowNamer = default_row_names) -> str:
    """Validate every row of a preference dataset with `split_example`; returns its layout
    (`detect_format`). Raw multi-completion rows are refused: build pairs first."""
    layout = detect_format(dataset)
    if layout == "raw-completions":
        raise ValueError("these are raw multi-completion rows; build pairs first with "
                         "`mixpo data pairs` (mixpo.data.pairs.build_pairs)")
    columns = [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]
    every_row(enumerate(dataset.select_columns(columns)),
              lambda item: split_example(item[1], row_names(item[0])))
    return layout


def identical_pairs(dataset: datasets.Dataset,
                    row_names: RowNamer = default_row_names) -> np.ndarray:
    """bool [n]: True where a row's chosen completion equals its rejected one (same prompt, so
    the whole pair is one response twice). Selective DPO drops these before scoring and
    selection (glorgao/SelectiveDPO `run_half.py` and `run_selective_dpo.py` filter
    `chosen != rejected`): their DPO loss is log 2 whatever the model learns. Rows are split
    with `split_example`, with its ValueErrors."""
    columns = [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]
    same = [example.chosen == example.rejected
            for example in (split_example(row, row_names(index))
                            for index, row in enumerate(dataset.select_columns(columns)))]
    return np.array(same, dtype=bool)


class DataWarning(UserWarning):
    """Rows that are valid but probably not what was meant (`row_warnings`); the CLI prints
    each as one `mixpo data: warning: ...` line."""


def _first_repeats(keys: dict, key: str, index: int, dataset: datasets.Dataset) -> int | None:
    """The earlier row index whose repr is `key` (None if `key`'s hash only collided)."""
    earlier = keys.setdefault(hash(key), index)
    if earlier == index:
        return None
    return earlier if repr(dataset[earlier]) == key else None


def row_warnings(dataset: datasets.Dataset, row_names: RowNamer = default_row_names,
                 identical: bool = True, batch_size: int = 2048) -> list[str]:
    """One-line warnings about valid preference rows that are probably not what was meant:
    a single row (nothing to order or route), pairs whose chosen equals rejected (with
    `identical`; their DPO loss is log 2 whatever the model learns) and rows that repeat an
    earlier row in every column. Rows must already be valid (`check_preference_rows`): the
    prompt is shared, so a pair's completions are equal exactly when its chosen and rejected
    columns are. One batched pass; only a hash per row is kept."""
    messages = []
    if len(dataset) == 1:
        messages.append(f"{getattr(row_names, 'source', 'the data')} has only 1 row: there is "
                        "nothing to order, select or route")
    same, first_same, repeats, first_repeat, keys = 0, None, 0, None, {}
    index = 0
    for batch in dataset.iter(batch_size=batch_size):
        columns = list(batch)
        for values in zip(*batch.values()):
            row = dict(zip(columns, values))
            if identical and row.get("chosen") == row.get("rejected"):
                same += 1
                first_same = index if first_same is None else first_same
            earlier = _first_repeats(keys, repr(row), index, dataset)
            if earlier is not None:
                repeats += 1
                first_repeat = (index, earlier) if first_repeat is None else first_repeat
            index += 1
    if same:
        verb = "has" if same == 1 else "have"
        messages.append(f"{same} of {len(dataset)} pairs {verb} chosen == rejected (the first: "
                        f"{row_names(first_same)}); they teach nothing (DPO loss log 2 whatever "
                        "the model learns): --select-easiest drops them, as Selective DPO does")
    if repeats:
        verb = "repeats" if repeats == 1 else "repeat"
        messages.append(f"{repeats} of {len(dataset)} rows {verb} an earlier row exactly (the "
                        f"first: {row_names(first_repeat[0])} repeats "
                        f"{row_names(first_repeat[1])}); each copy trains on its pair again")
    return messages


def _plain_conversation(messages: list[dict]) -> str:
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


def render_example(example: Example, tokenizer,
                   plain_conversations: bool = False) -> tuple[str, str, str]:
    """Texts to tokenize for `example`: (prompt, chosen completion, rejected completion).

    Conversational examples go through the tokenizer's chat template (the completion is the
    templated conversation minus the templated prompt, as TRL does). A tokenizer without one
    is refused, as TRL refuses it, unless `plain_conversations`: then `role: content` lines.
    Completions end with the EOS token, appended only when missing, as TRL does.
    """
    eos = getattr(tokenizer, "eos_token", None) or ""

    def ended(text: str) -> str:
        return text if eos and text.endswith(eos) else text + eos

    if not example.conversational:
        return example.prompt, ended(example.chosen), ended(example.rejected)
    if getattr(tokenizer, "chat_template", None):
        prompt_text = tokenizer.apply_chat_template(example.prompt, tokenize=False,
                                                    add_generation_prompt=True)
        completions = []
        for completion in (example.chosen, example.rejected):
            full = tokenizer.apply_chat_template(example.prompt + completion, tokenize=False)
            if not full.startswith(prompt_text):
                raise ValueError("the chat template does not render the prompt as a prefix of "
                                 "the conversation; cannot separate the completion")
            completions.append(full[len(prompt_text):])
        return prompt_text, completions[0], completions[1]
    if not plain_conversations:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"conversational rows need a tokenizer with a chat template and "
                         f"{name} has none (TRL refuses them too): use a tokenizer that has "
                         "one (tokenizer_name_or_path), or give prompt/chosen/rejected as "
                         "plain strings")
    prompt_text = _plain_conversation(example.prompt) + "assistant: "
    chosen_text = ended("\n".join(m["content"] for m in example.chosen))
    rejected_text = ended("\n".join(m["content"] for m in example.rejected))
    return prompt_text, chosen_text, rejected_text
