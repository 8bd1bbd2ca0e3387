"""Collate tokenized preference pairs into one batch: chosen rows first, then rejected rows.

One forward pass over [2B, T] serves both halves of every pair (TRL's concatenated layout,
which `mixpo.linear_preference_loss` expects). Per-pair columns (routing flag, rating scores,
difficulty, precomputed reference log-probs) travel with the batch.
"""
from __future__ import annotations

import torch

from mixpo.data.tokenize import PASSTHROUGH_COLUMNS
from mixpo.loss_spec import IGNORE_INDEX, shift_labels


LAYOUTS = ("padded", "packed", "shared")


class PreferenceBatch(dict):
    """A collated batch: the tensors each collator documents, by name (as a dict, so code
    that indexes them keeps working), typed by what every consumer needs the same way:

        layout: "padded" ([2B, T] rows), "packed" (padding-free, one row [1, L]) or "shared"
            (packed with each prompt read once);
        position_labels: labels aligned with positions in every layout (position t reads
            token t + 1; IGNORE_INDEX elsewhere); the padded layout's `labels` stay HF-style
            (label t = token t), as Hugging Face collators give them;
        completion: completion_rows / completion_sequences / completion_counts, the facts
            the logit-free loss needs about the labels, computed on the CPU;
        tokens: the tokens the model body runs (read on the host: call on the CPU batch);
        to(device): the batch on a device, still typed.

    Made by the three collators and by the TRL adapter (mixpo.integrations.trl_head);
    `PreferenceBatch.of` types a plain dict of the same tensors."""

    def __init__(self, tensors: dict, layout: str):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        super().__init__(tensors)
        self.layout = layout

    @classmethod
    def of(cls, batch: dict) -> "PreferenceBatch":
        if isinstance(batch, cls):
            return batch
        layout = "shared" if "segment_lengths" in batch else \
            "packed" if "sequence_lengths" in batch else "padded"
        return cls(batch, layout)

    @property
    def position_labels(self) -> torch.Tensor:
        if self.layout != "padded":
            return self["labels"]
        if "position_labels" in self:
            return self["position_labels"]
        return shift_labels(self["labels"])          # a plain dict typed by `of`

    @property
    def completion(self) -> dict:
        return {name: self.get(name) for name in
                ("completion_rows", "completion_sequences", "completion_counts")}

    @property
    def tokens(self) -> int:
        return int(self["attention_mask"].sum())

    def to(self, device, non_blocking: bool = True) -> "PreferenceBatch":
        return PreferenceBatch({name: tensor.to(device, non_blocking=non_blocking)
                                for name, tensor in self.items()}, self.layout)


def _check_counts(counts: torch.Tensor) -> None:
    """ValueError naming the sequences (up to 8) of the batch with no completion token."""
    if (counts == 0).any():
        raise ValueError(f"pair(s) {torch.nonzero(counts == 0).flatten().tolist()[:8]} of "
                         "the batch have no completion token")


def _chosen_then_rejected(examples: list[dict]) -> tuple[list, list]:
    """Token ids and HF labels of every chosen sequence, then every rejected one."""
    if not examples:
        raise ValueError("cannot collate an empty list of pairs")
    sequences = [e["chosen_input_ids"] for e in examples] + \
                [e["rejected_input_ids"] for e in examples]
    labels = [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples]
    return sequences, labels


class PreferenceCollator:
    """Pads a list of `tokenize_pair` outputs (B pairs; ids as lists or arrays) on the right.

    Returns a `PreferenceBatch` (a dict) of:
        input_ids [2B, T] int64 (padding = pad_token_id), attention_mask [2B, T] int64,
        labels [2B, T] int64 HF-style (label t = token t; prompt and padding = IGNORE_INDEX),
            and position_labels [2B, T], the same shifted once (label t = token t + 1),
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
        sequences, labels = _chosen_then_rejected(examples)
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
        shifted = shift_labels(label_ids)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_ids,
                 "position_labels": shifted}
        completion = shifted != IGNORE_INDEX
        counts = completion.sum(dim=1)
        _check_counts(counts)
        batch["completion_rows"] = torch.nonzero(completion.reshape(-1)).squeeze(1)
        batch["completion_counts"] = counts.float()
        batch.update(passthrough_columns(examples))
        return PreferenceBatch(batch, "padded")


def passthrough_columns(examples: list[dict]) -> dict:
    """The per-pair columns the examples carry, as [B] tensors (hard bool, others fp32)."""
    columns = {}
    for column in PASSTHROUGH_COLUMNS:
        present = [column in e for e in examples]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"column {column!r} is set on some pairs of the batch but not "
                             "on others")
        values = [e[column] for e in examples]
        if column == "hard":
            columns[column] = torch.tensor([bool(v) for v in values], dtype=torch.bool)
        else:
            columns[column] = torch.tensor(values, dtype=torch.float32)
    return columns


class PackedPreferenceCollator:
    """Padding-free batches: a micro-batch's 2B sequences (chosen rows first, then the rejected
    rows of the same pairs) concatenated into ONE row, with position ids restarting at every
    sequence, so no FLOP of the model body goes to padding.

    Returns a `PreferenceBatch` (a dict) of:
        input_ids [1, L] int64 and position_ids [1, L] int64, L = the sum of the lengths;
        sequence_lengths [2B] int64 (the model keeps attention within each sequence);
        labels [1, L] int64 already POSITION-ALIGNED (label t = the token at t + 1 of the same
            sequence; each sequence's last position and its prompt = IGNORE_INDEX);
        completion_rows [n] int64 (flat indices of the labelled positions, in sequence
            order), completion_sequences [n] int64 (the sequence of each) and
            completion_counts [2B] float32: what the logit-free loss needs, on the CPU;
        the per-pair columns as `PreferenceCollator` returns them.
    """

    def __init__(self, pad_token_id: int | None = None):
        self.pad_token_id = pad_token_id           # unused: nothing is padded

    def __call__(self, examples: list[dict]) -> dict:
        sequences, labels = _chosen_then_rejected(examples)
        ids, positions, aligned, lengths = [], [], [], []
        for sequence, hf_labels in zip(sequences, labels):
            sequence = torch.as_tensor(sequence, dtype=torch.long)
            ids.append(sequence)
            positions.append(torch.arange(len(sequence)))
            aligned.append(shift_labels(torch.as_tensor(hf_labels, dtype=torch.long)[None])[0])
            lengths.append(len(sequence))
        position_labels = torch.cat(aligned)[None]
        completion = position_labels[0] != IGNORE_INDEX
        rows = torch.nonzero(completion).squeeze(1)
        sequence_of_position = torch.repeat_interleave(torch.arange(len(lengths)),
                                                       torch.tensor(lengths))
        counts = torch.bincount(sequence_of_position[rows], minlength=len(lengths))
        _check_counts(counts)
        batch = {"input_ids": torch.cat(ids)[None], "position_ids": torch.cat(positions)[None],
                 "sequence_lengths": torch.tensor(lengths), "labels": position_labels,
                 "completion_rows": rows, "completion_sequences": sequence_of_position[rows],
                 "completion_counts": counts.float(),
                 "attention_mask": torch.ones(1, sum(lengths), dtype=torch.long)}
        batch.update(passthrough_columns(examples))
        return PreferenceBatch(batch, "packed")


class SharedPrefixCollator:
    """Padding-free batches in which chosen and rejected read their prompt once (prefix
    sharing, Wang et al. 2024, arXiv 2410.20305): each pair is laid out as
    [prompt | chosen completion | rejected completion] in ONE row, the completions' positions
    both continuing from the prompt's end, and the rejected tokens masked from the chosen
    ones (`mixpo.hf.policy.shared_prefix_attention`). Every hidden state then equals the one
    the unshared layout (`PackedPreferenceCollator`) computes, and the body's work drops by
    the prompts' share of the tokens.

    The loss reads the hidden states of its completion positions only, in the unshared
    layout's order (2B sequences, chosen first): `completion_positions` [n] gathers them
    from the shared row. The last prompt token appears twice there: it predicts both the
    chosen and the rejected response's first token.

    Returns a `PreferenceBatch` (a dict) of:
        input_ids [1, L] int64 and position_ids [1, L] int64, L = the sum over pairs of
            prompt + chosen + rejected completion tokens;
        segment_lengths [3B] int64: (prompt, chosen, rejected) token counts of each pair;
        completion_positions [n] int64: the row position whose hidden state predicts each
            completion token, in the unshared order (chosen sequences, then rejected);
        labels [1, n] int64: those completion tokens (position-aligned to the gathered
            hidden states), completion_rows = arange(n), completion_sequences [n] and
            completion_counts [2B] float32 as `PackedPreferenceCollator` returns them;
        attention_mask [1, L] of ones, and the per-pair columns.
    """

    def __init__(self, pad_token_id: int | None = None):
        self.pad_token_id = pad_token_id           # unused: nothing is padded

    def __call__(self, examples: list[dict]) -> dict:
        if not examples:
            raise ValueError("cannot collate an empty list of pairs")
        ids, positions, segments = [], [], []
        chosen_rows, rejected_rows, chosen_labels, rejected_labels = [], [], [], []
        offset = 0
        for example in examples:
            prompt_length = int(example["prompt_length"])
            chosen = torch.as_tensor(example["chosen_input_ids"], dtype=torch.long)
            rejected = torch.as_tensor(example["rejected_input_ids"], dtype=torch.long)
            if not torch.equal(chosen[:prompt_length], rejected[:prompt_length]):
                raise ValueError("prefix sharing needs chosen and rejected to start with the "
                                 "same prompt tokens")
            completions = [chosen[prompt_length:], rejected[prompt_length:]]
            ids += [chosen[:prompt_length], *completions]
            positions += [torch.arange(prompt_length)] + [
                torch.arange(prompt_length, prompt_length + len(c)) for c in completions]
            segments += [prompt_length, *map(len, completions)]
            prompt_at = torch.arange(offset, offset + prompt_length)
            start = offset + prompt_length
            for completion, hf_labels, rows_out, labels_out in (
                    (completions[0], example["chosen_labels"], chosen_rows, chosen_labels),
                    (completions[1], example["rejected_labels"], rejected_rows,
                     rejected_labels)):
                # Row position of each position of the unshared sequence (prompt, then this
                # completion's own segment); position t predicts token t + 1.
                where = torch.cat([prompt_at, torch.arange(start, start + len(completion))])
                hf_labels = torch.as_tensor(hf_labels, dtype=torch.long)
                predicted = hf_labels[1:] != IGNORE_INDEX
                rows_out.append(where[:-1][predicted])
                labels_out.append(hf_labels[1:][predicted])
                start += len(completion)
            offset = start
        rows = chosen_rows + rejected_rows
        counts = torch.tensor([len(r) for r in rows])
        _check_counts(counts)
        completion_positions = torch.cat(rows)
        batch = {"input_ids": torch.cat(ids)[None], "position_ids": torch.cat(positions)[None],
                 "segment_lengths": torch.tensor(segments),
                 "completion_positions": completion_positions,
                 "labels": torch.cat(chosen_labels + rejected_labels)[None],
                 "completion_rows": torch.arange(len(completion_positions)),
                 "completion_sequences": torch.repeat_interleave(
                     torch.arange(len(rows)), counts),
                 "completion_counts": counts.float(),
                 "attention_mask": torch.ones(1, offset, dtype=torch.long)}
        batch.update(passthrough_columns(examples))
        return PreferenceBatch(batch, "shared")
