"""Selective DPO's difficulty: the validation DPO loss of held-out reference models.

Following the authors (Gao et al. 2025, github glorgao/SelectiveDPO): for each seed, split
the pairs at random into `folds` parts (2 = halves); for each part, train a reference model
with DPO on the other parts, starting from the given model, which is also the frozen DPO
reference; during training score the held-out part `evals` times (every
total_steps // evals optimizer steps) with the per-pair, unreduced sigmoid DPO loss. An
example's difficulty is the mean of every score it gets (seeds x evals; 3 x 5 = 15 with the
defaults). Lower loss = easier.

The pieces are the trainer's: rows are tokenized by `mixpo.data.tokenize.tokenize_rows` and
batched by `mixpo.data.collate.PreferenceCollator`, and the model is
`mixpo.hf.policy.PreferenceModel` (model body + logit-free `mixpo.linear_preference_loss`;
reference log-probs through `mixpo.sequence_logps`). The trainer has no
evaluate-during-training hook, so the short DPO loop that trains each reference model is
`train_reference_model` below.

Differences from the authors' runs: reference models are trained with full parameters (they
use LoRA r=16; this package does not depend on peft), with constant-lr torch AdamW, in one
process (no FSDP): meant for models that fit one device with their optimizer state.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import datasets
import numpy as np
import torch

from mixpo.data.collate import PreferenceCollator
from mixpo.data.formats import VALIDATION_LOSS_COLUMN, check_preference_rows
from mixpo.data.io import RowNamer, default_row_names
from mixpo.data.tokenize import tokenize_rows
from mixpo.hf.loading import ensure_pad_token, load_causal_lm, load_tokenizer
from mixpo.hf.policy import PreferenceModel, pair_logps
from mixpo.loss_config import LossConfig


@dataclass(frozen=True)
class ValidationSettings:
    """Selective DPO scoring settings (defaults: the authors' 2 halves x seeds 41-43 x 5 evals,
    beta 0.01, batch 64, one epoch). `batch_size` pairs make one optimizer step, run as
    forward/backward passes of `micro_batch_size` pairs (None = all at once)."""

    folds: int = 2
    seeds: tuple[int, ...] = (41, 42, 43)
    evals: int = 5
    beta: float = 0.01
    learning_rate: float = 1e-6
    batch_size: int = 64
    micro_batch_size: int | None = 8
    epochs: int = 1
    max_length: int = 1024
    max_prompt_length: int | None = 512
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def forward_batch(self) -> int:
        return min(self.micro_batch_size or self.batch_size, self.batch_size)

    def check(self, num_examples: int) -> None:
        """ValueError for settings that cannot work on `num_examples` pairs."""
        if self.folds < 2:
            raise ValueError(f"--folds must be >= 2, got {self.folds}")
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        counts = (self.evals, self.batch_size, self.forward_batch, self.epochs)
        if min(counts) < 1 or self.max_length < 2:
            raise ValueError("--evals, --batch-size, --micro-batch-size and --epochs must be >= 1, "
                             "--max-length >= 2")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if num_examples < self.folds:
            raise ValueError(f"{num_examples} pairs cannot be split into {self.folds} folds")
        train_size = num_examples - math.ceil(num_examples / self.folds)
        steps = self.epochs * math.ceil(train_size / self.batch_size)
        if steps < self.evals:
            raise ValueError(f"training on {train_size} pairs takes {steps} optimizer steps, fewer "
                             f"than --evals {self.evals}; lower --batch-size or --evals")


@dataclass(frozen=True)
class ValidationSummary:
    """What `score_pairs` did, for the one-line report."""

    pairs: int
    reference_models: int
    scores_per_pair: int
    mean_loss: float

    def line(self) -> str:
        return (f"score-validation: {self.pairs} pairs, {self.reference_models} reference "
                f"models, {self.scores_per_pair} scores per pair, mean validation loss "
                f"{self.mean_loss:.4f}")


def _batches(indices: np.ndarray, batch_size: int):
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


class _Batches:
    """Collated, on-device batches of the tokenized pairs at given indices, with the matching
    reference log-probs laid out as the loss wants them ([chosen..., rejected...])."""

    def __init__(self, examples: list[dict], pad_token_id: int, device):
        self.examples, self.device = examples, device
        self.collate = PreferenceCollator(pad_token_id)

    def __call__(self, indices: np.ndarray, ref: torch.Tensor | None = None):
        batch = self.collate([self.examples[i] for i in indices])
        tensors = [batch[name].to(self.device)
                   for name in ("input_ids", "attention_mask", "labels")]
        ref_logps = None if ref is None else ref[indices].T.reshape(-1).to(self.device)
        return tensors, ref_logps


@torch.no_grad()
def held_out_losses(policy: PreferenceModel, batches: _Batches, indices: np.ndarray,
                    ref: torch.Tensor, batch_size: int) -> np.ndarray:
    """Unreduced sigmoid DPO loss of the pairs at `indices`, float64 [len(indices)]."""
    losses = []
    for batch_indices in _batches(indices, batch_size):
        tensors, ref_logps = batches(batch_indices, ref)
        _, out = policy(*tensors, ref_logps=ref_logps)
        losses.append(out.per_pair_loss.double().cpu().numpy())
    return np.concatenate(losses)


def train_reference_model(initial: PreferenceModel, batches: _Batches, train_indices: np.ndarray,
                          ref: torch.Tensor, settings: ValidationSettings, seed: int,
                          on_eval: Callable[[PreferenceModel, int], None]) -> None:
    """DPO-train a copy of `initial` on `train_indices` (shuffled by `seed`, `epochs` passes,
    AdamW at `learning_rate`, the loss `initial` was built with, precomputed reference
    log-probs `ref` [N, 2]) and call `on_eval(model, step)` every total_steps // evals
    optimizer steps, `evals` times. `initial` itself is not changed."""
    # The starting model may be frozen (loaded as a reference); its copy must learn.
    policy = copy.deepcopy(initial).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=settings.learning_rate)
    rng = np.random.default_rng(seed)
    steps_per_epoch = math.ceil(len(train_indices) / settings.batch_size)
    eval_every = (settings.epochs * steps_per_epoch) // settings.evals
    step = 0
    for _ in range(settings.epochs):
        for indices in _batches(rng.permutation(train_indices), settings.batch_size):
            optimizer.zero_grad(set_to_none=True)
            for micro_indices in _batches(indices, settings.forward_batch):
                tensors, ref_logps = batches(micro_indices, ref)
                loss, _ = policy(*tensors, ref_logps=ref_logps)
                # Weighted so the step follows the mean loss over the whole batch.
                (loss * (len(micro_indices) / len(indices))).backward()
            optimizer.step()
            step += 1
            if step % eval_every == 0 and step // eval_every <= settings.evals:
                policy.eval()
                on_eval(policy, step)
                policy.train()


def score_pairs(dataset: datasets.Dataset, model, tokenizer,
                settings: ValidationSettings = ValidationSettings(),
                row_names: RowNamer = default_row_names) -> tuple[np.ndarray, ValidationSummary]:
    """Mean held-out DPO loss of every pair, float64 [n] (module docstring), and a summary.

    `model` is a transformers causal LM (the starting point of every reference model and the
    frozen DPO reference; not changed), `tokenizer` its tokenizer (given EOS as its pad token
    if it has none). Raises ValueError for bad rows (naming them) and for settings that cannot
    work on this many pairs.
    """
    check_preference_rows(dataset, row_names)
    settings.check(len(dataset))
    pad_token_id = ensure_pad_token(tokenizer)
    examples = tokenize_rows(dataset.select_columns([c for c in ("prompt", "chosen", "rejected")
                                                     if c in dataset.column_names]),
                             tokenizer, settings.max_length, settings.max_prompt_length, row_names)
    policy = PreferenceModel(model, LossConfig(loss_type="sigmoid", beta=settings.beta)).eval()
    batches = _Batches(examples, pad_token_id, next(model.parameters()).device)
    ref = torch.cat([torch.stack(pair_logps(policy, examples[start:start + settings.forward_batch],
                                            batches.collate, batches.device), dim=1)
                     for start in range(0, len(examples), settings.forward_batch)])  # [n, 2]
    totals, counts = np.zeros(len(examples)), np.zeros(len(examples), dtype=np.int64)
    for seed in settings.seeds:
        shuffled = np.random.default_rng(seed).permutation(len(examples))
        folds = np.array_split(shuffled, settings.folds)
        for fold, held_out in enumerate(folds):
            train_indices = np.concatenate([f for i, f in enumerate(folds) if i != fold])

            def record(trained, step, held_out=held_out):
                totals[held_out] += held_out_losses(trained, batches, held_out, ref,
                                                    settings.forward_batch)
                counts[held_out] += 1

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                train_reference_model(policy, batches, train_indices, ref, settings, seed, record)
    scores = totals / counts
    summary = ValidationSummary(pairs=len(examples),
                                reference_models=len(settings.seeds) * settings.folds,
                                scores_per_pair=int(counts.min()), mean_loss=float(scores.mean()))
    return scores, summary


def score_validation_loss(dataset: datasets.Dataset, model_path: str,
                          settings: ValidationSettings = ValidationSettings(),
                          row_names: RowNamer = default_row_names,
                          ) -> tuple[datasets.Dataset, ValidationSummary]:
    """Load the causal LM (in `settings.dtype`, dropout off, as the trainer loads it) and the
    tokenizer at `model_path` and add a `validation_loss` column (float, lower = easier) to
    `dataset` with `score_pairs`; `prepare --difficulty validation-loss` reads it. Replaces an
    existing column of that name."""
    tokenizer = load_tokenizer(model_path)
    dtype = getattr(torch, settings.dtype)
    model = load_causal_lm(model_path, dtype, "sdpa", trainable=False).to(settings.device)
    scores, summary = score_pairs(dataset, model, tokenizer, settings, row_names)
    if VALIDATION_LOSS_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(VALIDATION_LOSS_COLUMN)
    return dataset.add_column(VALIDATION_LOSS_COLUMN, scores.tolist()), summary
