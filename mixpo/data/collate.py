"""Collate tokenized preference pairs into one batch: chosen rows first, then rejected rows.

One forward pass over [2B, T] serves both halves of every pair (TRL's concatenated layout,
which `mixpo.linear_preference_loss` expects). Per-pair columns (routing flag, rating scores,
difficulty, precomputed reference log-probs) travel with the batch.
"""
from __future__ import annotations

import torch

from mixpo.data.tokenize import IGNORE_INDEX, PASSTHROUGH_COLUMNS


class PreferenceCollator:
    """Pads a list of `tokenize_pair` outputs (B pairs; ids as lists or arrays) on the right.

    Returns a dict:
        input_ids [2B, T] int64 (padding = pad_token_id), attention_mask [2B, T] int64,
        labels [2B, T] int64 HF-style (label t = token t; prompt and padding = IGNORE_INDEX;
            shift with `mixpo.shift_labels` before the loss),
        completion_rows [n] int64: the flat indices (into [2B * T]) of the positions whose
            shifted label is a completion token, and completion_counts [2B] float32 (what
            the logit-free loss needs about the batch's shape, computed here on the CPU so the
            training step never waits on the device for it),
        hard [B] bool, and score_chosen / score_rejected / difficulty / ref_chosen_logps /
            ref_rejected_logps [B] float32, each only when the examples carry it (all of them
            must, or none).
    T is the longest sequence, rounded up to `pad_to_multiple_of` when given.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: give the tokenizer a pad token (or use EOS)")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict:
        if not examples:
            raise ValueError("cannot collate an empty list of pairs")
        sequences = [e["chosen_input_ids"] for e in examples] + \
                    [e["rejected_input_ids"] for e in examples]
        labels = [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples]
        length = max(map(len, sequences))
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        label_ids = torch.full((len(sequences), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, (ids, row_labels) in enumerate(zip(sequences, labels)):
            input_ids[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            label_ids[row, :len(row_labels)] = torch.as_tensor(row_labels, dtype=torch.long)
            attention_mask[row, :len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids}
        shifted = torch.full_like(label_ids, IGNORE_INDEX)
        shifted[:, :-1] = label_ids[:, 1:]
        completion = shifted != IGNORE_INDEX
        counts = completion.sum(dim=1)
        if (counts == 0).any():
            raise ValueError(f"pair(s) {torch.nonzero(counts == 0).flatten().tolist()[:8]} of "
                             "the batch have no completion token")
        batch["completion_rows"] = torch.nonzero(completion.reshape(-1)).squeeze(1)
        batch["completion_counts"] = counts.float()

        for column in PASSTHROUGH_COLUMNS:
            present = [column in e for e in examples]
            if not any(present):
                continue
            if not all(present):
                raise ValueError(f"column {column!r} is set on some pairs of the batch but not "
                                 "on others")
            values = [e[column] for e in examples]
            if column == "hard":
                batch[column] = torch.tensor([bool(v) for v in values], dtype=torch.bool)
            else:
                batch[column] = torch.tensor(values, dtype=torch.float32)
        return batch
