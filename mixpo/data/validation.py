"""Selective DPO's difficulty: the validation DPO loss of held-out reference models.

Following the authors (Gao et al. 2025, github glorgao/SelectiveDPO): for each seed, split
the pairs at random into `folds` parts (2 = halves); for each part, train a reference model
with DPO on the other parts, starting from the given model, which is also the frozen DPO
reference; during training score the held-out part `evals` times (every
total_steps // evals optimizer steps) with the per-pair, unreduced sigmoid DPO loss. An
example's difficulty is the mean of every score it gets (seeds x evals; 3 x 5 = 15 with the
defaults). Lower loss = easier.

Differences from the authors' runs: reference models are trained with full parameters (they
use LoRA r=16; this package does not depend on peft) and the per-pair loss comes from
mixpo's own `linear_preference_loss` / `sequence_logps` (the logit-free path).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import datasets
import numpy as np
import torch

import mixpo
from mixpo.data.formats import VALIDATION_LOSS_COLUMN, check_preference_rows, render_example, split_example
from mixpo.data.io import RowNamer, default_row_names

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ValidationSettings:
    """Selective DPO scoring settings (defaults: the authors' 2 halves x seeds 41-43 x 5 evals,
    beta 0.01, one epoch)."""

    folds: int = 2
    seeds: tuple[int, ...] = (41, 42, 43)
    evals: int = 5
    beta: float = 0.01
    learning_rate: float = 1e-6
    batch_size: int = 8
    epochs: int = 1
    max_length: int = 1024
    device: str = "cpu"

    def check(self, num_examples: int) -> None:
        """ValueError for settings that cannot work on `num_examples` pairs."""
        if self.folds < 2:
            raise ValueError(f"--folds must be >= 2, got {self.folds}")
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        if self.evals < 1 or self.batch_size < 1 or self.epochs < 1 or self.max_length < 2:
            raise ValueError("--evals, --batch-size and --epochs must be >= 1, --max-length >= 2")
        if num_examples < self.folds:
            raise ValueError(f"{num_examples} pairs cannot be split into {self.folds} folds")
        train_size = num_examples - math.ceil(num_examples / self.folds)
        steps = self.epochs * math.ceil(train_size / self.batch_size)
        if steps < self.evals:
            raise ValueError(f"training on {train_size} pairs takes {steps} optimizer steps, fewer "
                             f"than --evals {self.evals}; lower --batch-size or --evals")


@dataclass(frozen=True)
class ValidationSummary:
    pairs: int
    reference_models: int
    scores_per_pair: int
    mean_loss: float

    def line(self) -> str:
        return (f"score-validation: {self.pairs} pairs, {self.reference_models} reference "
                f"models, {self.scores_per_pair} scores per pair, mean validation loss "
                f"{self.mean_loss:.4f}")


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair: prompt, chosen completion, rejected completion."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def tokenize_pairs(dataset: datasets.Dataset, tokenizer, max_length: int,
                   row_names: RowNamer = default_row_names) -> list[TokenizedPair]:
    """Tokenize every pair (see mixpo.data.formats.render_example). Sequences longer than
    `max_length` keep at most the last max_length // 2 prompt tokens, then lose the end of
    the completion, so every completion keeps at least one token."""
    special = not getattr(tokenizer, "chat_template", None)  # templates write their own BOS
    columns = [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]
    pairs = []
    for index, row in enumerate(dataset.select_columns(columns)):
        prompt, chosen, rejected = render_example(split_example(row, row_names(index)), tokenizer)
        prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
        completions = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (chosen, rejected)]
        if any(not ids for ids in completions):
            raise ValueError(f"{row_names(index)}: a completion tokenizes to no tokens")
        if len(prompt_ids) + max(len(ids) for ids in completions) > max_length:
            prompt_ids = prompt_ids[-(max_length // 2):]
            completions = [ids[:max_length - len(prompt_ids)] for ids in completions]
        pairs.append(TokenizedPair(prompt_ids, completions[0], completions[1]))
    return pairs


def collate_pairs(pairs: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Batch tensors in mixpo's layout: rows 0..B-1 chosen, B..2B-1 rejected; `labels` are
    position-aligned (label t = token t+1), prompt and padding = IGNORE_INDEX."""
    sequences = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    prompt_lengths = [len(p.prompt) for p in pairs] * 2
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for row, (sequence, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[row, :len(sequence)] = torch.tensor(sequence)
        attention_mask[row, :len(sequence)] = 1
        labels[row, prompt_length:len(sequence)] = torch.tensor(sequence[prompt_length:])
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "labels": mixpo.shift_labels(labels, IGNORE_INDEX)}


def _hidden_and_head(model, batch: dict[str, torch.Tensor]):
    """Last hidden states of the model body (no logits) and the LM-head weight and bias."""
    hidden = model.base_model(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"]).last_hidden_state
    head = model.get_output_embeddings()
    return hidden, head.weight, head.bias


def _batches(indices: np.ndarray, batch_size: int):
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


def _to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in batch.items()}


@torch.no_grad()
def reference_logps(model, pairs: list[TokenizedPair], pad_token_id: int,
                    batch_size: int) -> torch.Tensor:
    """Summed completion log-probs of the frozen reference, [N, 2] (chosen, rejected), on CPU,
    from `mixpo.sequence_logps`."""
    device = next(model.parameters()).device
    model.eval()
    result = torch.empty(len(pairs), 2)
    for batch_indices in _batches(np.arange(len(pairs)), batch_size):
        batch = _to_device(collate_pairs([pairs[i] for i in batch_indices], pad_token_id), device)
        hidden, weight, bias = _hidden_and_head(model, batch)
        logps = mixpo.sequence_logps(hidden, weight, batch["labels"], bias=bias).float().cpu()
        result[batch_indices] = logps.view(2, -1).T
    return result


def _pair_losses(model, pairs, indices, ref, pad_token_id, beta, batch_size) -> np.ndarray:
    """Unreduced sigmoid DPO loss of the pairs at `indices`, float64 [len(indices)]."""
    device = next(model.parameters()).device
    losses = []
    with torch.no_grad():
        for batch_indices in _batches(indices, batch_size):
            batch = _to_device(collate_pairs([pairs[i] for i in batch_indices], pad_token_id), device)
            hidden, weight, bias = _hidden_and_head(model, batch)
            ref_logps = ref[batch_indices].T.reshape(-1).to(device)
            out = mixpo.linear_preference_loss(hidden, weight, batch["labels"], bias=bias,
                                               ref_logps=ref_logps, loss_type="sigmoid", beta=beta)
            losses.append(out.per_pair_loss.double().cpu().numpy())
    return np.concatenate(losses)


def train_reference_model(initial_model, pairs: list[TokenizedPair], train_indices: np.ndarray,
                          ref: torch.Tensor, pad_token_id: int, settings: ValidationSettings,
                          seed: int, on_eval: Callable[[torch.nn.Module, int], None]) -> None:
    """DPO-train a copy of `initial_model` on `train_indices` (shuffled by `seed`, `epochs`
    passes, AdamW at `learning_rate`, sigmoid loss at `beta`, the initial model as reference)
    and call `on_eval(model, step)` every total_steps // evals optimizer steps, `evals` times.

    This is the small, self-contained trainer Selective DPO's scoring needs; it uses the
    public loss API (`mixpo.linear_preference_loss`) on the model body's hidden states.
    """
    model = copy.deepcopy(initial_model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    rng = np.random.default_rng(seed)
    steps_per_epoch = math.ceil(len(train_indices) / settings.batch_size)
    eval_every = (settings.epochs * steps_per_epoch) // settings.evals
    device = next(model.parameters()).device
    step = 0
    for _ in range(settings.epochs):
        for batch_indices in _batches(rng.permutation(train_indices), settings.batch_size):
            batch = _to_device(collate_pairs([pairs[i] for i in batch_indices], pad_token_id), device)
            hidden, weight, bias = _hidden_and_head(model, batch)
            out = mixpo.linear_preference_loss(
                hidden, weight, batch["labels"], bias=bias,
                ref_logps=ref[batch_indices].T.reshape(-1).to(device),
                loss_type="sigmoid", beta=settings.beta)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            step += 1
            if step % eval_every == 0 and step // eval_every <= settings.evals:
                model.eval()
                on_eval(model, step)
                model.train()


def score_pairs(dataset: datasets.Dataset, model, tokenizer,
                settings: ValidationSettings = ValidationSettings(),
                row_names: RowNamer = default_row_names) -> tuple[np.ndarray, ValidationSummary]:
    """Mean held-out DPO loss of every pair, float64 [n] (module docstring), and a summary.

    `model` is a transformers causal LM (the starting point and the frozen reference),
    `tokenizer` its tokenizer. Both are left unchanged.
    """
    check_preference_rows(dataset, row_names)
    settings.check(len(dataset))
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token to pad with")
    pairs = tokenize_pairs(dataset, tokenizer, settings.max_length, row_names)
    ref = reference_logps(model, pairs, pad_token_id, settings.batch_size)
    totals, counts = np.zeros(len(pairs)), np.zeros(len(pairs), dtype=np.int64)
    for seed in settings.seeds:
        folds = np.array_split(np.random.default_rng(seed).permutation(len(pairs)), settings.folds)
        for fold, held_out in enumerate(folds):
            train_indices = np.concatenate([f for i, f in enumerate(folds) if i != fold])

            def record(trained, step, held_out=held_out):
                totals[held_out] += _pair_losses(trained, pairs, held_out, ref, pad_token_id,
                                                 settings.beta, settings.batch_size)
                counts[held_out] += 1

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                train_reference_model(model, pairs, train_indices, ref, pad_token_id, settings,
                                      seed, record)
    scores = totals / counts
    summary = ValidationSummary(pairs=len(pairs), reference_models=len(settings.seeds) * settings.folds,
                                scores_per_pair=int(counts.min()), mean_loss=float(scores.mean()))
    return scores, summary


def score_validation_loss(dataset: datasets.Dataset, model_path: str,
                          settings: ValidationSettings = ValidationSettings(),
                          row_names: RowNamer = default_row_names) -> tuple[datasets.Dataset, ValidationSummary]:
    """Load the causal LM and tokenizer at `model_path` (fp32, on `settings.device`) and add
    a `validation_loss` column (float, lower = easier) to `dataset` with `score_pairs`;
    `prepare --difficulty validation-loss` reads it. Replaces an existing column of that name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(settings.device)
    scores, summary = score_pairs(dataset, model, tokenizer, settings, row_names)
    if VALIDATION_LOSS_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(VALIDATION_LOSS_COLUMN)
    return dataset.add_column(VALIDATION_LOSS_COLUMN, scores.tolist()), summary
