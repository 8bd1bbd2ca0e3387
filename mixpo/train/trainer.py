"""The training loop, top to bottom: check the options and the data -> lock the output
directory -> data -> model -> reference log-probs -> optimizer -> resume -> steps (accumulate
micro-batches, clip, step, log, evaluate, checkpoint) -> final export.

One process: `python -m mixpo train recipe.yaml`. Several: `torchrun --nproc_per_node N -m
mixpo train recipe.yaml` shards the model with FSDP2; the global batch (pairs per optimizer
step) and the order of the data stay the same for any number of processes.

A step never waits on the device: the batch's shape comes from the CPU collator, the loss API
runs with validate=False, metrics stay on the device until a logging step. A non-finite loss
or gradient norm sets a device-side flag, read at logging and save steps: the run then stops
with a message naming the step and learning rate, and nothing non-finite is ever saved, so a
rerun resumes from the last finite checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from pathlib import Path

import numpy as np
import torch

from mixpo.files import atomic_write_text, check_replaceable
from mixpo.hf.loading import (attention_implementation, load_causal_lm, load_tokenizer,
                              runs_flash_attention, torch_dtype)
from mixpo.hf.policy import PreferenceModel, decoder_layers
from mixpo.margins import AdaptiveMargin
from mixpo.train import checkpoint, distributed
from mixpo.train.config import TrainConfig
from mixpo.train.metrics import MetricsLog, MetricsWindow, peak_memory_gb
from mixpo.train.optim import (apply_updates, attach_step_in_backward, build_optimizers,
                               learning_rate_at, set_lr)
from mixpo.train.ref_logps import attach_reference_logps, cache_key

PREPARE_HINT = ("produce it with `mixpo data prepare RAW -o {path}` (from UltraFeedback-style "
                "rows, e.g. HuggingFaceH4/ultrafeedback_binarized saved with save_to_disk or as "
                "parquet), or point train_file at your own preference data")


class Diverged(ValueError):
    """The loss or gradient norm became non-finite."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; says where a rerun resumes (the CLI prints it as one line)."""


def check_data_paths(cfg: TrainConfig) -> None:
    """The data files exist: checked first, before any model or tokenizer is loaded."""
    if not cfg.train_file:
        raise ValueError("train_file is empty: give a preference data file")
    for option in ("train_file", "eval_file"):
        path = getattr(cfg, option)
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{option} {path}: no such file or directory; "
                                    + PREPARE_HINT.format(path=path))


def load_examples(cfg: TrainConfig, tokenizer, env, path: str, split: str = "",
                  prepare: bool = True) -> list[dict]:
    """Rows of `path` -> (optionally scored, selected, routed, ordered) -> tokenized."""
    from mixpo.data.difficulty import prepare_dataset
    from mixpo.data.io import load_rows
    from mixpo.data.tokenize import tokenize_rows

    dataset, row_names = load_rows(path, split or None)
    source_rows = list(range(len(dataset)))
    if cfg.difficulty and prepare:
        # Remember each row's place in the file so errors still name the right line.
        dataset = dataset.add_column("__source_row", source_rows)
        routes = {name: getattr(cfg, name) for name in
                  ("route_below", "route_at_or_below", "route_fraction")
                  if getattr(cfg, name) is not None}
        dataset, summary = prepare_dataset(
            dataset, difficulty=cfg.difficulty, select_easiest=cfg.select_easiest,
            order=cfg.order, seed=cfg.seed, row_names=row_names,
            score_columns=tuple(cfg.score_columns) if cfg.score_columns else None, **routes)
        source_rows = dataset["__source_row"]
        if env.is_main:
            print(summary.line())
    elif prepare and cfg.order == "shuffle":
        # No difficulty, random order: a seeded permutation of the file (TRL's sampler order
        # for baselines such as SimPO on data without scores).
        source_rows = np.random.default_rng(cfg.seed).permutation(len(dataset)).tolist()
        dataset = dataset.select(source_rows)
    examples = tokenize_rows(dataset, tokenizer, cfg.max_length, cfg.max_prompt_length,
                             row_names=lambda index: row_names(source_rows[index]))
    # MixDPO routing only when the run asks for it (a `hard` column alone routes nothing).
    if not cfg.routes:
        for example in examples:
            example.pop("hard", None)
    elif env.is_main:
        routed = sum(bool(example.get("hard")) for example in examples)
        print(f"routing: {routed} of {len(examples)} pairs take the SFT loss of their chosen "
              "response")
    if prepare and cfg.group_by_length > 1:
        examples = group_by_length(examples, cfg.group_by_length, env.is_main)
    return examples


def group_by_length(examples: list[dict], window: int, verbose: bool = True) -> list[dict]:
    """Stable sort by pair length (chosen + rejected tokens) inside consecutive windows of
    `window` rows: micro-batches then hold similar lengths (less padding, even packs) while
    the easy-to-hard order holds from window to window."""
    grouped, moved = [], 0
    for start in range(0, len(examples), window):
        block = examples[start:start + window]
        order = sorted(range(len(block)), key=lambda i: len(block[i]["chosen_input_ids"])
                       + len(block[i]["rejected_input_ids"]))
        moved += sum(position != index for position, index in enumerate(order))
        grouped.extend(block[i] for i in order)
    if verbose:
        print(f"group_by_length: pairs sorted by length inside windows of {window} rows; "
              f"{moved} of {len(examples)} moved (never across a window)")
    return grouped


def make_collator(cfg: TrainConfig, tokenizer, env):
    """Padded rows, packed rows (padding_free) or packed rows with each prompt read once
    (prefix_sharing; flash-attn's varlen kernels cannot mask the rejected response from the
    chosen one, so under flash-attn the rows stay unshared, said once)."""
    from mixpo.data.collate import (PackedPreferenceCollator, PreferenceCollator,
                                    SharedPrefixCollator)

    if not cfg.padding_free:
        return PreferenceCollator(tokenizer.pad_token_id)
    if cfg.prefix_sharing:
        if not runs_flash_attention(cfg.attn_implementation, env.device):
            return SharedPrefixCollator()
        if env.is_main:
            print("prefix_sharing: flash-attn cannot mask the rejected response from the "
                  "chosen one; packing unshared rows (use attn_implementation sdpa to share)")
    return PackedPreferenceCollator()


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def weights_dtype(cfg: TrainConfig, env) -> torch.dtype:
    """The parameters' dtype: fp32 master weights under mixed precision."""
    return torch.float32 if cfg.mixed_precision != "no" else torch_dtype(cfg.dtype, env.device)


def autocast(cfg: TrainConfig, env):
    """Mixed precision for one process (FSDP2 casts the gathered parameters instead)."""
    enabled = cfg.mixed_precision != "no" and not env.distributed
    return torch.autocast(env.device.type, dtype=COMPUTE_DTYPES.get(cfg.mixed_precision),
                          enabled=enabled)


def build_policy(cfg: TrainConfig, env, trainable: bool = True) -> PreferenceModel:
    dtype = weights_dtype(cfg, env)
    causal_lm = load_causal_lm(cfg.model_name_or_path, dtype,
                               attention_implementation(cfg.attn_implementation, env.device),
                               cfg.gradient_checkpointing and trainable, trainable)
    # The reference model needs only its log-probs: the same transform and LD-DPO weighting.
    model = PreferenceModel(causal_lm.to(env.device), cfg.loss_config())
    return distributed.shard(model, decoder_layers(causal_lm), env,
                             COMPUTE_DTYPES.get(cfg.mixed_precision))


def train(cfg: TrainConfig, env=None) -> dict:
    """Run (or resume, or recognise as finished) the training `cfg` describes; `env` is an
    already joined process group (the demo's), else one is set up and torn down here.
    Returns {'output_dir', 'final_dir', 'completed_steps', 'last_metrics'}."""
    cfg.validate()
    check_data_paths(cfg)
    output_dir = Path(cfg.output_dir)
    check_replaceable(output_dir / checkpoint.FINAL_DIR, checkpoint.OWNER)
    joined = contextlib.nullcontext(env) if env is not None else \
        distributed.process_group(cfg.device, cfg.ddp_timeout)
    try:
        with joined as env, checkpoint.output_lock(output_dir, enabled=env.is_main):
            return _train(cfg, env)
    except KeyboardInterrupt:
        latest = checkpoint.latest_checkpoint(output_dir)
        raise Interrupted(f"interrupted; rerun the same command to resume from "
                          f"{latest or 'the start (no checkpoint was saved yet)'}") from None


def _reference_logps(cfg, policy, examples, collator, env, output_dir, key, name):
    """Precomputed reference log-probs attached to `examples` (cached beside the output)."""
    with autocast(cfg, env):
        origin = attach_reference_logps(examples, policy, collator, env, key=key,
                                        output_dir=output_dir,
                                        batch_size=cfg.reference_batch_size,
                                        progress=cfg.progress_bar, cache_name=name)
    if env.is_main:
        label = "" if name == "reference_logps.pt" else " (eval)"
        print(f"reference log-probs{label}: {origin} ({output_dir / name})")


@dataclasses.dataclass
class Run:
    """Everything the loop reads, built once by `prepare`."""
    cfg: TrainConfig
    env: object
    output_dir: Path
    tokenizer: object
    examples: list
    eval_examples: list
    collator: object
    sampler: object
    fingerprint: str
    policy: PreferenceModel | None = None
    reference_model: PreferenceModel | None = None
    margin: AdaptiveMargin | None = None
    optimizers: list = dataclasses.field(default_factory=list)
    grad_sq_sum: torch.Tensor | None = None      # step_in_backward's running |g|^2
    window: MetricsWindow = dataclasses.field(default_factory=MetricsWindow)
    params: list = dataclasses.field(default_factory=list)    # the trainable parameters
    log: MetricsLog | None = None
    resumed: bool = False
    finished: bool = False       # the final export already holds every step

    @property
    def total_steps(self) -> int:
        return self.sampler.total_steps


@dataclasses.dataclass
class Watch:
    """The loop's bookkeeping: the device-side divergence flag (the first step whose loss or
    gradient norm is not finite, -1 while none), each step's learning rate, the last saved
    step and the last logged row."""
    first_bad_step: torch.Tensor
    last_saved: int
    learning_rates: dict = dataclasses.field(default_factory=dict)
    row: dict | None = None


def _train(cfg: TrainConfig, env) -> dict:
    from tqdm.auto import tqdm

    run = prepare(cfg, env)
    if run.finished:
        return {"output_dir": str(run.output_dir), "completed_steps": run.total_steps,
                "final_dir": str(run.output_dir / checkpoint.FINAL_DIR), "last_metrics": None}
    watch = Watch(torch.full((), -1, dtype=torch.long, device=env.device),
                  last_saved=run.sampler.start_step if run.resumed else 0)
    run.policy.train()
    progress = tqdm(total=run.total_steps, initial=run.sampler.start_step, desc="train",
                    disable=not (env.is_main and cfg.progress_bar))
    for step in run.sampler:
        lr, grad_norm = train_step(run, step, watch)
        progress.update(1)
        after_step(run, watch, step.index + 1, lr, grad_norm, progress)
    progress.close()
    run.log.close()
    final_dir = finish(run, watch)
    return {"output_dir": str(run.output_dir), "final_dir": str(final_dir),
            "completed_steps": run.total_steps, "last_metrics": watch.row}


def prepare(cfg: TrainConfig, env) -> Run:
    """Data, model, reference log-probs, optimizer and resume. A run whose final export
    already holds every step comes back `finished`, with no model loaded."""
    run = _prepare_data(cfg, env)
    if run.finished:
        return run
    _prepare_model(run)
    _resume(run)
    return run


def _prepare_data(cfg: TrainConfig, env) -> Run:
    import yaml

    from mixpo.data.sampler import CurriculumSampler

    output_dir = Path(cfg.output_dir)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    examples = load_examples(cfg, tokenizer, env, cfg.train_file, cfg.split)
    eval_examples = load_examples(cfg, tokenizer, env, cfg.eval_file, cfg.eval_split,
                                  prepare=False) if cfg.eval_file else []
    micro = cfg.per_device_train_batch_size
    global_batch = cfg.global_batch_size if cfg.gradient_accumulation_steps is None \
        else micro * cfg.gradient_accumulation_steps * env.world_size
    sampler = CurriculumSampler(len(examples), global_batch, micro, env.world_size, env.rank,
                                cfg.num_train_epochs, cfg.max_steps, drop_last=cfg.drop_last)
    if cfg.step_in_backward and (sampler.accumulation_steps > 1 or env.distributed):
        raise ValueError("step_in_backward needs one backward per step on one process: set "
                         "per_device_train_batch_size = global_batch_size and run without "
                         f"torchrun (now {sampler.accumulation_steps} micro-batches x "
                         f"{env.world_size} processes)")
    fingerprint = cache_key(cfg.model_name_or_path, weights_dtype(cfg, env), examples,
                            cfg.ld_alpha)
    run = Run(cfg, env, output_dir, tokenizer, examples, eval_examples,
              make_collator(cfg, tokenizer, env), sampler, fingerprint)
    previous = distributed.broadcast_object(
        checkpoint.previous_run(output_dir) if env.is_main else None, env)
    checkpoint.check_same_run(previous, cfg.to_dict(), output_dir, fingerprint,
                              cfg.resume_on_changed_data)
    if previous is not None and previous["completed_steps"] == run.total_steps:
        if env.is_main:
            print(f"{output_dir / checkpoint.FINAL_DIR} already holds this run's "
                  f"{run.total_steps} steps; nothing to do")
        run.finished = True
        return run
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial_checkpoints(output_dir)
        atomic_write_text(output_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(),
                                                                     sort_keys=False))
        if sampler.dropped_rows_per_epoch:
            print(f"note: drop_last: the last {sampler.dropped_rows_per_epoch} pairs of each "
                  f"epoch do not fill a global batch of {global_batch} and are skipped")
        elif sampler.last_batch_rows < global_batch:
            print(f"note: each epoch ends with a smaller step of {sampler.last_batch_rows} "
                  f"pairs (the hardest, in an easy-first order); drop_last skips it")
    distributed.barrier(env)
    return run


def _prepare_model(run: Run) -> None:
    """The policy, the reference (precomputed log-probs, or a frozen copy), gamma-PO's
    solver and the optimizers."""
    cfg, env = run.cfg, run.env
    dtype = weights_dtype(cfg, env)
    run.policy = build_policy(cfg, env)
    if env.is_main and cfg.optim == "adamw" and dtype != torch.float32:
        print("note: torch AdamW on 16-bit parameters rounds updates smaller than the "
              "parameters' resolution away (most of them at lr ~1e-6); optim adamw_bf16 "
              "rounds stochastically instead")
    if not cfg.reference_free and cfg.reference == "precomputed":
        # The policy has not moved yet, so it *is* the reference model for this pass.
        _reference_logps(cfg, run.policy, run.examples, run.collator, env, run.output_dir,
                         run.fingerprint, "reference_logps.pt")
        if run.eval_examples:
            _reference_logps(cfg, run.policy, run.eval_examples, run.collator, env,
                             run.output_dir, cache_key(cfg.model_name_or_path, dtype,
                                                       run.eval_examples, cfg.ld_alpha),
                             "reference_logps_eval.pt")
    elif not cfg.reference_free:
        run.reference_model = build_policy(cfg, env, trainable=False)
    # gamma-PO; each rank keeps its own queue, as the authors do.
    run.margin = AdaptiveMargin.from_options(cfg, seed=cfg.seed + env.rank, check_finite=False)
    run.optimizers = build_optimizers(run.policy, cfg, env.device)
    run.params = [p for p in run.policy.parameters() if p.requires_grad]
    if cfg.step_in_backward:
        run.grad_sq_sum = attach_step_in_backward(run.optimizers, env.device)


def _resume(run: Run) -> None:
    """Load the newest usable checkpoint, if any, and open the metrics log."""
    from tqdm.auto import tqdm

    cfg, env = run.cfg, run.env
    resume_from = distributed.broadcast_object(
        checkpoint.usable_checkpoint(run.output_dir, env.world_size) if env.is_main else None,
        env)
    if resume_from is not None:
        trainer_state, rank_state = checkpoint.load_checkpoint(resume_from, run.policy,
                                                               run.optimizers, env)
        run.sampler.load_state_dict(trainer_state["sampler"])
        if run.sampler.start_step > run.total_steps:
            raise ValueError(f"{resume_from} is past this run's last step ({run.total_steps}); "
                             "raise max_steps / num_train_epochs or use another output_dir")
        run.window.load_state_dict(rank_state["metrics_window"])
        if run.margin is not None:
            run.margin.load_state_dict(rank_state["margin"])
        run.resumed = True
        if env.is_main:
            print(f"resuming from {resume_from} (step {run.sampler.start_step} of "
                  f"{run.total_steps})")
    run.log = MetricsLog(run.output_dir, env.is_main,
                         run.sampler.start_step if run.resumed else None, cfg.report_to,
                         run_name=run.output_dir.name, config=cfg.to_dict(),
                         total_steps=run.total_steps,
                         printer=tqdm.write if cfg.progress_bar else print)


def train_step(run: Run, step, watch: Watch):
    """One optimizer step: its micro-batches forward and backward, then clip and update (or,
    with step_in_backward, the updates already made). Returns (lr, grad norm tensor); the
    divergence flag is updated on the device."""
    cfg, env = run.cfg, run.env
    lr = learning_rate_at(cfg.lr_scheduler_type, step.index, run.total_steps,
                          math.ceil(cfg.warmup_ratio * run.total_steps), cfg.learning_rate)
    watch.learning_rates[step.index + 1] = lr
    set_lr(run.optimizers, lr)
    step_finite = torch.ones((), dtype=torch.bool, device=env.device)
    for indices in step.micro_batches:
        # A rank with no rows left in a last, smaller step runs a stand-in with weight 0,
        # so that every rank takes part in the same collectives.
        weight = len(indices) * env.world_size / step.pairs
        batch = run.collator([run.examples[i] for i in (indices or [0])])
        tokens = batch.tokens if indices else 0          # on the CPU batch
        batch = batch.to(env.device)
        ref_logps = _batch_reference(cfg, run.reference_model, batch, env)
        with autocast(cfg, env):
            loss, out = run.policy(batch, ref_logps=ref_logps,
                                   margin=run.margin if indices else None, validate=False)
        # The step's loss is the mean over its pairs on every rank (FSDP averages ranks).
        (loss * weight).backward()
        step_finite &= torch.isfinite(loss)
        if indices:
            run.window.add(out, tokens=tokens)
    grad_norm = apply_updates(run.params, run.optimizers, cfg.max_grad_norm, run.grad_sq_sum)
    local_norm = grad_norm.to_local() if hasattr(grad_norm, "to_local") else grad_norm
    step_finite &= torch.isfinite(local_norm).all()
    watch.first_bad_step = torch.where((watch.first_bad_step < 0) & ~step_finite,
                                       torch.full_like(watch.first_bad_step, step.index + 1),
                                       watch.first_bad_step)
    return lr, grad_norm


def after_step(run: Run, watch: Watch, done: int, lr: float, grad_norm, progress) -> None:
    """Log, evaluate and checkpoint when step `done` is due for it (the divergence flag is
    read on the host only then)."""
    cfg, env = run.cfg, run.env
    logging_step = done % cfg.logging_steps == 0 or done == run.total_steps
    saving_step = cfg.save_steps and done % cfg.save_steps == 0
    eval_step = run.eval_examples and ((cfg.eval_steps and done % cfg.eval_steps == 0)
                                       or done == run.total_steps)
    if logging_step or saving_step or eval_step:
        _stop_if_diverged(watch.first_bad_step, watch.learning_rates, watch.last_saved, env)
    if logging_step:
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 DTensor (collective: every rank)
            grad_norm = grad_norm.full_tensor()
        watch.row = {"step": done, **run.window.summarize(env), "learning_rate": lr,
                     "grad_norm": grad_norm.item(), "memory/peak_gb": peak_memory_gb(env.device)}
    if eval_step:
        evaluation = evaluate(cfg, run.policy, run.eval_examples, run.collator,
                              run.reference_model, env, run.margin)
        watch.row = {**watch.row, **evaluation} if logging_step \
            else {"step": done, **evaluation}
    if logging_step or eval_step:
        run.log.write(watch.row)
        progress.set_postfix(loss=f"{watch.row.get('loss', float('nan')):.4f}")
    if saving_step:
        _save(run, watch, done, lr)


def _save(run: Run, watch: Watch, done: int, lr: float) -> None:
    if not checkpoint.all_finite(run.policy, run.env):
        raise Diverged(f"training diverged by step {done} (learning_rate {lr:.3g}): the "
                       f"weights are not finite; nothing was saved after step "
                       f"{watch.last_saved}")
    sampler_state = {**run.sampler.state_dict(), "start_step": done}
    rank_state = {"metrics_window": run.window.state_dict(),
                  "margin": None if run.margin is None else run.margin.state_dict()}
    checkpoint.save_checkpoint(
        run.output_dir, done, run.policy, run.optimizers,
        {"step": done, "sampler": sampler_state, "world_size": run.env.world_size,
         "config": run.cfg.to_dict(), "fingerprint": run.fingerprint}, rank_state, run.env,
        run.cfg.save_total_limit)
    watch.last_saved = done


def finish(run: Run, watch: Watch) -> Path:
    """The final divergence check and the Hugging Face export (`OUTPUT/final/`)."""
    _stop_if_diverged(watch.first_bad_step, watch.learning_rates, watch.last_saved, run.env)
    if not checkpoint.all_finite(run.policy, run.env):
        raise Diverged(f"training diverged (learning_rate {run.cfg.learning_rate:.3g}): the "
                       "final weights are not finite; nothing was exported")
    final_dir = checkpoint.export_final(
        run.output_dir, run.policy, run.policy.causal_lm, run.tokenizer,
        {"completed_steps": run.total_steps, "config": run.cfg.to_dict(),
         "fingerprint": run.fingerprint}, run.env)
    if run.env.is_main:
        print(f"saved {final_dir}")
    return final_dir


def _batch_reference(cfg, reference_model, batch, env):
    """The micro-batch's reference log-probs [2B]: precomputed, from the live reference
    model, or None for a reference-free loss."""
    if reference_model is not None:
        with autocast(cfg, env):
            ref_logps = reference_model(batch, logps_only=True)
        if env.distributed:
            reference_model.reshard()  # no backward follows to reshard its root
        return ref_logps
    if cfg.reference_free:
        return None
    return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])


def _stop_if_diverged(first_bad_step, learning_rates, last_saved, env) -> None:
    """Read the device-side divergence flag (a host sync, at logging / save steps only);
    every rank stops at the first bad step any rank saw."""
    bad = int(first_bad_step.item())
    bad = distributed.all_reduce_min(bad if bad > 0 else 2**62, env)
    if bad < 2**62:
        where = f"checkpoint-{last_saved}" if last_saved else "the start"
        raise Diverged(f"training diverged at step {bad} (learning_rate "
                       f"{learning_rates.get(bad, float('nan')):.3g}): the loss or gradient norm "
                       f"is not finite; nothing was saved after step {last_saved}, a rerun "
                       f"resumes from {where} (lower learning_rate or raise warmup)")


@torch.no_grad()
def evaluate(cfg, policy, examples, collator, reference_model, env, margin=None) -> dict:
    """eval/* metrics of the held-out pairs: the same loss, with gamma-PO's fixed evaluation
    margin when `margin` is the run's solver (eval pairs never enter its queue), TRL's
    metric names."""
    policy.eval()
    shares = [list(range(start, min(start + cfg.per_device_train_batch_size, len(examples))))
              for start in range(env.rank * cfg.per_device_train_batch_size, len(examples),
                                 cfg.per_device_train_batch_size * env.world_size)]
    rounds = math.ceil(len(examples) / (cfg.per_device_train_batch_size * env.world_size))
    window = MetricsWindow()
    for round_index in range(rounds):
        indices = shares[round_index] if round_index < len(shares) else []
        batch = collator([examples[i] for i in (indices or [0])]).to(env.device)
        ref_logps = _batch_reference(cfg, reference_model, batch, env)
        gamma = None
        if margin is not None:
            gamma = torch.full((len(indices or [0]),), margin.evaluation_gamma,
                               device=env.device)
        with autocast(cfg, env):
            _, out = policy(batch, ref_logps=ref_logps, gamma=gamma, validate=False)
        if indices:
            window.add(out, tokens=0)
    summary = window.summarize(env)
    summary.pop("tokens_per_second", None)
    policy.train()
    return {f"eval/{name}": value for name, value in summary.items()}
