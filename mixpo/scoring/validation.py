"""Selective DPO's difficulty: the validation DPO loss of held-out reference models.

Following the authors (Gao et al. 2025; github glorgao/SelectiveDPO, `curriculum-lens/`):
- pairs whose chosen equals rejected are dropped first (`run_half.py`), and counted;
- for each seed (41, 42, 43), the pairs are permuted (`np.random.seed(seed);
  np.random.permutation(n)`) and split into `folds` parts (2 = halves, cut at n // 2); for
  each part a reference model is trained with sigmoid DPO (beta 0.01, 1 epoch) on the other
  parts, starting from the given model;
- the reference models are LoRA adapters (peft; r 16, alpha 16, dropout 0.05, on the
  q/k/v/o/gate/up/down projections the model has), lr 3e-5, effective batch 512 pairs per
  optimizer step (gradient accumulation over micro-batches), cosine schedule with 10 %
  warmup (transformers' `get_cosine_schedule_with_warmup`, as their HF Trainer), AdamW with
  fp32 states (the adapters are fp32 whatever the model dtype; their `paged_adamw_32bit`),
  weight decay 0 and gradient clipping at 1.0 (HF Trainer defaults);
- the DPO reference is the frozen starting model (`dpo_diagnostician.py`: the adapter
  disabled): its log-probs are computed once, before any adapter exists;
- each reference model scores its held-out part every total_steps // evals optimizer steps,
  `evals` (5) times, where total_steps = epochs * (train pairs // batch) as in
  `run_half.py` (the training itself keeps the last short batch); a score is the per-pair,
  unreduced sigmoid DPO loss with summed log-probs (`dpo_diagnostician.py`);
- an example's difficulty is the mean of every score it gets (`make_curricula.py`):
  seeds x evals = 15 with the defaults. Lower loss = easier.
`full_parameter=True` trains a copy of the whole model instead (the optimizer states then
have the model's dtype); it needs room for the copy and its optimizer state.

The pieces are the trainer's: rows are tokenized by `mixpo.data.tokenize.tokenize_rows` and
batched by `mixpo.data.collate.PreferenceCollator`, and the model is
`mixpo.hf.policy.PreferenceModel` (model body + logit-free `mixpo.linear_preference_loss`;
reference log-probs through `mixpo.sequence_logps`). The trainer has no
evaluate-during-training hook, so the short DPO loop that trains each reference model is
`train_reference_model` below. One process, no FSDP.
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import datasets
import numpy as np
import torch

from mixpo.data.collate import PreferenceCollator
from mixpo.data.formats import (VALIDATION_LOSS_COLUMN, check_finite_scores,
                                check_preference_rows, identical_pairs)
from mixpo.data.io import RowNamer, default_row_names
from mixpo.data.tokenize import tokenize_rows
from mixpo.hf.loading import check_device, ensure_pad_token, load_causal_lm, load_tokenizer
from mixpo.hf.policy import PreferenceModel, pair_logps
from mixpo.loss_config import LossConfig
from mixpo.schedule import learning_rate_at, set_lr
from mixpo.scoring import LORA_TARGET_MODULES


def log_to_stderr(line: str) -> None:
    """The default progress log: one line on stderr (stdout carries the summary)."""
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ValidationSettings:
    """Selective DPO scoring settings; the defaults are the authors' (module docstring).

    `batch_size` pairs make one optimizer step (the effective batch, 512), run as
    forward/backward passes of `micro_batch_size` pairs (None = all at once).
    `full_parameter=True` trains the whole model instead of LoRA adapters (then the lora_*
    settings are unused).
    """

    folds: int = 2
    seeds: tuple[int, ...] = (41, 42, 43)
    evals: int = 5
    beta: float = 0.01
    learning_rate: float = 3e-5
    batch_size: int = 512
    micro_batch_size: int | None = 8
    epochs: int = 1
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    full_parameter: bool = False
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    max_length: int = 1024
    max_prompt_length: int | None = 512
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def forward_batch(self) -> int:
        return min(self.micro_batch_size or self.batch_size, self.batch_size)

    def schedule(self, train_size: int, batch_size: int | None = None) -> tuple[int, int, int]:
        """(optimizer steps, scoring interval, scorings) for a reference model trained on
        `train_size` pairs: every pair is used (ceil), the interval is the authors'
        max((epochs * (train_size // batch)) // evals, 1), at most `evals` scorings."""
        batch = batch_size or self.batch_size
        steps = self.epochs * math.ceil(train_size / batch)
        interval = max((self.epochs * (train_size // batch)) // self.evals, 1)
        return steps, interval, min(self.evals, steps // interval)

    def describe(self, targets: list[str] | None = None) -> str:
        """'LoRA r 16 alpha 16 dropout 0.05 on q_proj,...; lr 3e-05' or 'full-parameter; ...'."""
        if self.full_parameter:
            return f"full-parameter; lr {self.learning_rate:g}"
        where = f" on {','.join(targets)}" if targets else ""
        return (f"LoRA r {self.lora_r} alpha {self.lora_alpha:g} dropout {self.lora_dropout:g}"
                f"{where}; lr {self.learning_rate:g}")

    def check_options(self) -> None:
        """ValueError naming the option for a setting that cannot work on any data (counts
        below 1, a --max-length under 2 tokens, a device this machine lacks); cheap, so the
        CLI runs it before reading the data."""
        if self.folds < 2:
            raise ValueError(f"--folds must be >= 2, got {self.folds}")
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        for option, value in (("--evals", self.evals), ("--batch-size", self.batch_size),
                              ("--micro-batch-size", self.micro_batch_size),
                              ("--epochs", self.epochs),
                              ("--max-prompt-length", self.max_prompt_length)):
            if value is not None and value < 1:
                raise ValueError(f"{option} must be >= 1, got {value}")
        if self.max_length < 2:
            raise ValueError(f"--max-length must be >= 2 (a prompt token and a completion "
                             f"token), got {self.max_length}")
        check_device(self.device)
    def check(self, num_examples: int) -> None:
        """ValueError (naming the option) for settings that cannot work on `num_examples`
        pairs (`check_options` first). An effective batch too large for the data is an error,
        with the largest --batch-size that gives `evals` scorings (the authors' 512 assumes
        UltraFeedback's ~30,000 pairs per half), never a silent change of the schedule."""
        self.check_options()
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not self.full_parameter:
            if self.lora_r < 1 or not self.lora_alpha > 0 or not 0 <= self.lora_dropout < 1:
                raise ValueError("--lora-r must be >= 1, --lora-alpha > 0 and --lora-dropout "
                                 f"in [0, 1); got {self.lora_r}, {self.lora_alpha}, "
                                 f"{self.lora_dropout}")
            if not self.lora_target_modules:
                raise ValueError("--lora-target-modules needs at least one module name")
        if num_examples < self.folds:
            raise ValueError(f"{num_examples} pairs cannot be split into {self.folds} folds")
        train_size = num_examples - math.ceil(num_examples / self.folds)
        steps, _, scorings = self.schedule(train_size)
        if scorings < self.evals:
            fits = [b for b in range(min(self.batch_size, train_size), 0, -1)
                    if self.schedule(train_size, b)[2] == self.evals]
            hint = (f"use --batch-size {fits[0]} or less" if fits else "lower --evals")
            raise ValueError(f"--batch-size {self.batch_size} on the {train_size} training pairs "
                             f"of a fold gives {steps} optimizer step(s), too few for --evals "
                             f"{self.evals} scorings; {hint} (the authors' 512 is for "
                             "UltraFeedback's ~30,000 pairs per half)")


@dataclass(frozen=True)
class ValidationSummary:
    """What `score_pairs` / `score_validation_loss` did, for the one-line report."""

    pairs: int
    reference_models: int
    scores_per_pair: int
    mean_loss: float
    method: str = ""
    identical_dropped: int = 0

    def line(self) -> str:
        return (f"score-validation: {self.pairs} pairs ({self.identical_dropped} dropped as "
                f"chosen == rejected), {self.reference_models} reference models, "
                f"{self.scores_per_pair} scores per pair ({self.method}), mean validation "
                f"loss {self.mean_loss:.4f}")


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
        batch = self.collate([self.examples[i] for i in indices]).to(self.device)
        ref_logps = None if ref is None else ref[indices].T.reshape(-1).to(self.device)
        return batch, ref_logps


@torch.no_grad()
def held_out_losses(policy: PreferenceModel, batches: _Batches, indices: np.ndarray,
                    ref: torch.Tensor, batch_size: int) -> np.ndarray:
    """Unreduced sigmoid DPO loss of the pairs at `indices`, float64 [len(indices)]."""
    losses = []
    for batch_indices in _batches(indices, batch_size):
        batch, ref_logps = batches(batch_indices, ref)
        _, out = policy(batch, ref_logps=ref_logps)
        losses.append(out.per_pair_loss.double().cpu().numpy())
    return np.concatenate(losses)


def lora_targets(causal_lm, wanted: tuple[str, ...] = LORA_TARGET_MODULES) -> list[str]:
    """The names in `wanted` that name linear layers of `causal_lm`; ValueError when none
    does."""
    present = {name.rsplit(".", 1)[-1] for name, module in causal_lm.named_modules()
               if isinstance(module, torch.nn.Linear)}
    head = causal_lm.get_output_embeddings()
    head_names = {name.rsplit(".", 1)[-1] for name, module in causal_lm.named_modules()
                  if module is head}
    if head_names & set(wanted):
        raise ValueError(f"--lora-target-modules {sorted(head_names & set(wanted))}: a LoRA on "
                         "the LM head is not supported (the logit-free loss reads its weight); "
                         "leave it out")
    found = [name for name in wanted if name in present]
    if not found:
        raise ValueError(f"none of the LoRA target modules {list(wanted)} is a linear layer of "
                         f"{type(causal_lm).__name__}; name them with --lora-target-modules "
                         "or use --full-parameter")
    return found


@contextlib.contextmanager
def _trainable(initial: PreferenceModel, settings: ValidationSettings):
    """(policy in training mode, its trainable parameters) for one reference model.

    LoRA: fresh adapters (peft, initialised from the current torch RNG) are injected into
    `initial`'s model in place and removed again on exit (`unload`, not merged), so the
    model's own weights never change; their requires_grad flags and mode are restored.
    Full-parameter: a trainable deep copy of `initial`."""
    if settings.full_parameter:
        # The starting model may be frozen (loaded as a reference); its copy must learn.
        policy = copy.deepcopy(initial).train().requires_grad_(True)
        yield policy, list(policy.parameters())
        return
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("LoRA reference models need peft (pip install peft); or pass "
                         "--full-parameter") from None
    causal_lm = initial.causal_lm
    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                        lora_dropout=settings.lora_dropout, bias="none",
                        target_modules=lora_targets(causal_lm, settings.lora_target_modules))
    flags = {name: p.requires_grad for name, p in causal_lm.named_parameters()}
    was_training = initial.training
    causal_lm.requires_grad_(False)
    with warnings.catch_warnings():  # peft asks transformers a deprecated question
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                category=FutureWarning)
        adapted = get_peft_model(causal_lm, config)  # fp32 adapters (autocast_adapter_dtype)
    try:
        parameters = [p for p in causal_lm.parameters() if p.requires_grad]
        yield initial.train(), parameters
    finally:
        adapted.unload()
        for name, parameter in causal_lm.named_parameters():
            parameter.requires_grad_(flags.get(name, False))
        initial.train(was_training)


def train_reference_model(initial: PreferenceModel, batches: _Batches, train_indices: np.ndarray,
                          ref: torch.Tensor, settings: ValidationSettings, seed: int,
                          on_eval: Callable[[PreferenceModel, int], None]) -> None:
    """DPO-train one reference model from `initial` on `train_indices` (shuffled by `seed`,
    `epochs` passes, the loss `initial` was built with, precomputed reference log-probs `ref`
    [N, 2]) and call `on_eval(model, step)` at the scoring steps of `settings.schedule`, in
    eval mode. LoRA adapters or a full copy (`_trainable`); `initial`'s weights are not
    changed. AdamW (weight decay 0) with the trainer's cosine schedule and warmup
    (`mixpo.schedule`, equal to transformers' get_cosine_schedule_with_warmup), gradients
    clipped to `max_grad_norm`, as the authors' HF Trainer."""
    steps, interval, _ = settings.schedule(len(train_indices))
    warmup = math.ceil(settings.warmup_ratio * steps)
    rng = np.random.default_rng(seed)
    with _trainable(initial, settings) as (policy, parameters):
        optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=0.0)
        step = 0
        for _ in range(settings.epochs):
            for indices in _batches(rng.permutation(train_indices), settings.batch_size):
                set_lr([optimizer], learning_rate_at("cosine", step, steps, warmup,
                                                     settings.learning_rate))
                optimizer.zero_grad(set_to_none=True)
                for micro_indices in _batches(indices, settings.forward_batch):
                    batch, ref_logps = batches(micro_indices, ref)
                    loss, _ = policy(batch, ref_logps=ref_logps)
                    # Weighted so the step follows the mean loss over the whole batch.
                    (loss * (len(micro_indices) / len(indices))).backward()
                if settings.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
                optimizer.step()
                step += 1
                if step % interval == 0 and step // interval <= settings.evals:
                    policy.eval()
                    on_eval(policy, step)
                    policy.train()


def split_folds(count: int, seed: int, folds: int) -> list[np.ndarray]:
    """The authors' split (`run_half.py`): `np.random.seed(seed); permutation(count)`, cut at
    k * count // folds (halves: the first part is the first count // 2 indices)."""
    order = np.random.RandomState(seed).permutation(count)
    cuts = [k * count // folds for k in range(1, folds)]
    return np.split(order, cuts)


def score_pairs(dataset: datasets.Dataset, model, tokenizer,
                settings: ValidationSettings = ValidationSettings(),
                row_names: RowNamer = default_row_names,
                log: Callable[[str], None] | None = log_to_stderr,
                ) -> tuple[np.ndarray, ValidationSummary]:
    """Mean held-out DPO loss of every pair, float64 [n] (module docstring), and a summary.

    `model` is a transformers causal LM (the starting point of every reference model and the
    frozen DPO reference; its weights are not changed: LoRA adapters are removed after each
    reference model), `tokenizer` its tokenizer (given EOS as its pad token if it has none).
    Pairs are scored as given: drop chosen == rejected first (`score_validation_loss` does).
    `log` gets one progress line per reference model and per scoring (None: silent).
    Raises ValueError for bad rows (naming them) and for settings that cannot work on this
    many pairs.
    """
    say = log or (lambda line: None)
    check_preference_rows(dataset, row_names)
    settings.check(len(dataset))
    targets = None if settings.full_parameter else lora_targets(model,
                                                                settings.lora_target_modules)
    pad_token_id = ensure_pad_token(tokenizer)
    examples = tokenize_rows(dataset.select_columns([c for c in ("prompt", "chosen", "rejected")
                                                     if c in dataset.column_names]),
                             tokenizer, settings.max_length, settings.max_prompt_length, row_names)
    policy = PreferenceModel(model, LossConfig(loss_type="sigmoid", beta=settings.beta)).eval()
    batches = _Batches(examples, pad_token_id, next(model.parameters()).device)
    say(f"score-validation: reference log-probs of {len(examples)} pairs (the starting model)")
    ref = torch.cat([torch.stack(pair_logps(policy, examples[start:start + settings.forward_batch],
                                            batches.collate, batches.device), dim=1)
                     for start in range(0, len(examples), settings.forward_batch)])  # [n, 2]
    method = settings.describe(targets)
    totals, counts = np.zeros(len(examples)), np.zeros(len(examples), dtype=np.int64)
    total_models, number = len(settings.seeds) * settings.folds, 0
    for seed in settings.seeds:
        folds = split_folds(len(examples), seed, settings.folds)
        for fold, held_out in enumerate(folds):
            number += 1
            train_indices = np.concatenate([f for i, f in enumerate(folds) if i != fold])
            steps, interval, scorings = settings.schedule(len(train_indices))
            say(f"score-validation: reference model {number}/{total_models} (seed {seed}, "
                f"held-out part {fold + 1}/{settings.folds}: {len(held_out)} pairs): {method}, "
                f"{steps} steps of {settings.batch_size} pairs on {len(train_indices)}, "
                f"scoring every {interval} steps")
            done = [0]

            def record(trained, step, held_out=held_out, steps=steps, done=done):
                losses = held_out_losses(trained, batches, held_out, ref, settings.forward_batch)
                totals[held_out] += losses
                counts[held_out] += 1
                done[0] += 1
                say(f"score-validation:   step {step}/{steps}: held-out DPO loss "
                    f"{losses.mean():.4f} (scoring {done[0]}/{settings.evals})")

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                train_reference_model(policy, batches, train_indices, ref, settings, seed, record)
    scores = totals / counts
    summary = ValidationSummary(pairs=len(examples), reference_models=total_models,
                                scores_per_pair=int(counts.min()), mean_loss=float(scores.mean()),
                                method=method)
    return scores, summary


def score_validation_loss(dataset: datasets.Dataset, model_path: str,
                          settings: ValidationSettings = ValidationSettings(),
                          row_names: RowNamer = default_row_names,
                          log: Callable[[str], None] | None = log_to_stderr,
                          ) -> tuple[datasets.Dataset, ValidationSummary]:
    """Drop the pairs whose chosen equals rejected (counted in the summary), load the causal
    LM (in `settings.dtype`, dropout off, as the trainer loads it) and the tokenizer at
    `model_path`, and add a `validation_loss` column (float, lower = easier) with
    `score_pairs`; `prepare --difficulty validation-loss` reads it. Replaces an existing
    column of that name. Rows and settings are checked before the model loads."""
    check_preference_rows(dataset, row_names)
    same = identical_pairs(dataset, row_names)
    kept = np.flatnonzero(~same)
    if len(kept) == 0:
        raise ValueError(f"all {len(dataset)} pairs have chosen == rejected; nothing to score")
    if same.any():
        dataset = dataset.select(kept.tolist())
    settings.check(len(dataset))
    tokenizer = load_tokenizer(model_path)
    dtype = getattr(torch, settings.dtype)
    model = load_causal_lm(model_path, dtype, "sdpa", trainable=False).to(settings.device)
    scores, summary = score_pairs(dataset, model, tokenizer, settings,
                                  lambda index: row_names(int(kept[index])), log)
    check_finite_scores(scores, (f"{row_names(int(index))}, column {VALIDATION_LOSS_COLUMN!r}"
                                 for index in kept), "the validation DPO loss is",
                        "a float16/bfloat16 overflow? try --dtype float32, or a lower --lr")
    if VALIDATION_LOSS_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(VALIDATION_LOSS_COLUMN)
    summary = replace(summary, identical_dropped=int(same.sum()))
    return dataset.add_column(VALIDATION_LOSS_COLUMN, scores.tolist()), summary
