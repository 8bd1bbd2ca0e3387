"""Reward-model difficulty: score chosen and rejected with a sequence-classification reward
model (MixDPO's "reward score margin" variant, e.g. Skywork-Reward-Llama-3.1-8B).

Adds `reward_chosen` and `reward_rejected` columns; `prepare --difficulty reward` then uses
reward_chosen - reward_rejected as the difficulty (bigger = easier).
"""
from __future__ import annotations

import datasets
import torch

from mixpo.data.formats import (REWARD_COLUMNS, Example, check_finite_scores,
                                check_preference_rows, render_example, split_example)
from mixpo.data.io import RowNamer, default_row_names
from mixpo.hf.loading import check_device, ensure_pad_token, load_pretrained


def check_reward_settings(batch_size: int = 8, max_length: int | None = None,
                          device: str | None = None) -> None:
    """ValueError naming the option for a batch size or truncation length below 1, or a
    device this machine lacks (`check_device`); cheap, so run before anything is loaded."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"--max-length must be >= 1 (tokens kept), got {max_length}")
    if device is not None:
        check_device(device)


def load_reward_model(model_path: str, device: str = "cpu", dtype: str | None = None):
    """(model, tokenizer) from a local directory or Hub name: an
    AutoModelForSequenceClassification with one output, in eval mode on `device` (in `dtype`,
    e.g. 'bfloat16', when given). ValueError when it cannot be loaded or has several outputs,
    or when this machine has no `device` (checked first)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_device(device)
    tokenizer = load_pretrained(AutoTokenizer, model_path, "tokenizer")
    model = load_pretrained(AutoModelForSequenceClassification, model_path, "reward model",
                            dtype=getattr(torch, dtype) if dtype else None)
    if model.config.num_labels != 1:
        raise ValueError(f"{model_path}: a reward model has one output (num_labels=1), "
                         f"this one has {model.config.num_labels}")
    return model.to(device).eval(), tokenizer


def _as_chat(example: Example) -> Example:
    """Plain-string pairs as a one-turn chat: reward models are trained on chat-formatted
    conversations, so with a chat template they score those, not bare concatenations."""
    if example.conversational:
        return example
    return Example([{"role": "user", "content": example.prompt}],
                   [{"role": "assistant", "content": example.chosen}],
                   [{"role": "assistant", "content": example.rejected}])


@torch.inference_mode()
def reward_scores(texts: list[str], model, tokenizer, batch_size: int = 8,
                  max_length: int | None = None, add_special_tokens: bool = True) -> list[float]:
    """The reward model's scalar score of each text, float list [len(texts)].

    Texts are batched by length (less padding) and, with `max_length`, truncated from the
    left so the end of the response, where the reward is read, is kept. A tokenizer without a
    pad token gets EOS as its pad token (and the model config that pad id), which is how
    sequence-classification models find each sequence's last token.
    """
    check_reward_settings(batch_size, max_length)
    ensure_pad_token(tokenizer, model)  # the model finds each sequence's last token by it
    by_length = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    scores = [0.0] * len(texts)
    device = next(model.parameters()).device
    truncation_side, tokenizer.truncation_side = tokenizer.truncation_side, "left"
    try:
        for start in range(0, len(by_length), batch_size):
            batch = by_length[start:start + batch_size]
            encoded = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True,
                                truncation=max_length is not None, max_length=max_length,
                                add_special_tokens=add_special_tokens).to(device)
            logits = model(input_ids=encoded["input_ids"],
                           attention_mask=encoded["attention_mask"]).logits
            for i, value in zip(batch, logits[:, 0].float().tolist()):
                scores[i] = value
    finally:
        tokenizer.truncation_side = truncation_side
    return scores


def score_with_reward_model(dataset: datasets.Dataset, model, tokenizer, batch_size: int = 8,
                            max_length: int | None = None,
                            row_names: RowNamer = default_row_names) -> datasets.Dataset:
    """`dataset` with `reward_chosen` / `reward_rejected` (floats) added (replacing old ones).

    Each pair is rendered as prompt + completion (through the tokenizer's chat template when
    it has one, plain-string pairs as a one-turn chat; see mixpo.data.formats.render_example)
    and scored by `model`, an
    AutoModelForSequenceClassification with num_labels=1. Rows are validated first
    (ValueError naming the row and column for an empty chosen/rejected).
    """
    check_reward_settings(batch_size, max_length)
    check_preference_rows(dataset, row_names)
    chat = bool(getattr(tokenizer, "chat_template", None))
    chosen_texts, rejected_texts = [], []
    columns = [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]
    for index, row in enumerate(dataset.select_columns(columns)):
        example = split_example(row, row_names(index))
        # Reward models without a chat template score `role: content` lines.
        prompt, chosen, rejected = render_example(_as_chat(example) if chat else example,
                                                  tokenizer, plain_conversations=True)
        chosen_texts.append(prompt + chosen)
        rejected_texts.append(prompt + rejected)
    # A chat template already writes BOS; adding it again would shift the reward.
    special = not chat
    scores = reward_scores(chosen_texts + rejected_texts, model, tokenizer, batch_size,
                           max_length, add_special_tokens=special)
    check_finite_scores(scores, [f"{row_names(i)}, column {REWARD_COLUMNS[side]!r}"
                                 for side in (0, 1) for i in range(len(dataset))],
                        "the reward model returned",
                        "a float16/bfloat16 overflow? try --dtype float32")
    result = dataset.remove_columns([c for c in REWARD_COLUMNS if c in dataset.column_names])
    result = result.add_column(REWARD_COLUMNS[0], scores[:len(dataset)])
    return result.add_column(REWARD_COLUMNS[1], scores[len(dataset):])
