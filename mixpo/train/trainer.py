"""The training loop, top to bottom: data -> model -> reference log-probs -> optimizer ->
resume -> steps (accumulate micro-batches, clip, step, log, checkpoint) -> final export.

One process: `python -m mixpo train recipe.yaml`. Several: `torchrun --nproc_per_node N -m
mixpo train recipe.yaml` shards the model with FSDP2; the global batch (pairs per optimizer
step) and the order of the data stay the same for any number of processes.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch

from mixpo.hf.loading import attention_implementation, load_causal_lm, load_tokenizer, torch_dtype
from mixpo.hf.policy import PreferenceModel, decoder_layers
from mixpo.margins import AdaptiveMargin
from mixpo.train import checkpoint, distributed
from mixpo.train.config import TrainConfig
from mixpo.train.metrics import MetricsLog, MetricsWindow, peak_memory_gb
from mixpo.train.optim import attach_step_in_backward, build_optimizers, cosine_lr, set_lr
from mixpo.train.ref_logps import attach_reference_logps


def load_examples(cfg: TrainConfig, tokenizer, env) -> list[dict]:
    """Rows of cfg.train_file -> (optionally scored, selected, routed, ordered) -> tokenized."""
    from mixpo.data.difficulty import prepare_dataset
    from mixpo.data.io import load_rows
    from mixpo.data.tokenize import tokenize_rows

    if not cfg.train_file:
        raise ValueError("train_file is empty: give a preference data file")
    dataset, row_names = load_rows(cfg.train_file)
    source_rows = list(range(len(dataset)))
    if cfg.difficulty:
        # Remember each row's place in the file so errors still name the right line.
        dataset = dataset.add_column("__source_row", source_rows)
        dataset, summary = prepare_dataset(
            dataset, difficulty=cfg.difficulty, route_below=cfg.route_below,
            route_fraction=cfg.route_fraction, select_easiest=cfg.select_easiest,
            order=cfg.order, seed=cfg.seed, row_names=row_names)
        source_rows = dataset["__source_row"]
        if env.is_main:
            print(summary.line())
    examples = tokenize_rows(dataset, tokenizer, cfg.max_length, cfg.max_prompt_length,
                             row_names=lambda index: row_names(source_rows[index]))
    if not cfg.routing:
        for example in examples:
            example.pop("hard", None)
    return examples


def build_policy(cfg: TrainConfig, env, trainable: bool = True) -> PreferenceModel:
    dtype = torch_dtype(cfg.dtype, env.device)
    causal_lm = load_causal_lm(cfg.model_name_or_path, dtype,
                               attention_implementation(cfg.attn_implementation, env.device),
                               cfg.gradient_checkpointing and trainable, trainable)
    # The reference model needs only its log-probs: the same transform and LD-DPO weighting.
    model = PreferenceModel(causal_lm.to(env.device), cfg.loss_config())
    return distributed.shard(model, decoder_layers(causal_lm), env)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume, or recognise as finished) the training `cfg` describes.
    Returns {'output_dir', 'final_dir', 'completed_steps', 'last_metrics'}."""
    cfg.validate()
    env = distributed.setup(cfg.device)
    try:
        return _train(cfg, env)
    finally:
        distributed.teardown(env)


def _train(cfg: TrainConfig, env) -> dict:
    import yaml
    from tqdm.auto import tqdm

    from mixpo.data.collate import PreferenceCollator
    from mixpo.data.sampler import CurriculumSampler

    output_dir = Path(cfg.output_dir)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # ---- data ------------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.model_name_or_path)
    examples = load_examples(cfg, tokenizer, env)
    collator = PreferenceCollator(tokenizer.pad_token_id)
    sampler = CurriculumSampler(len(examples), cfg.global_batch_size, cfg.micro_batch_size,
                                env.world_size, env.rank, cfg.num_epochs, cfg.max_steps)
    if cfg.step_in_backward and (sampler.accumulation_steps > 1 or env.distributed):
        raise ValueError("step_in_backward needs one backward per step on one process: set "
                         "micro_batch_size = global_batch_size and run without torchrun "
                         f"(now {sampler.accumulation_steps} micro-batches x {env.world_size} "
                         "processes)")
    total_steps = sampler.total_steps
    previous = distributed.broadcast_object(
        checkpoint.previous_run(output_dir) if env.is_main else None, env)
    checkpoint.check_same_run(previous, cfg.to_dict(), output_dir)
    if previous is not None and previous["completed_steps"] == total_steps:
        if env.is_main:
            print(f"{output_dir / checkpoint.FINAL_DIR} already holds this run's {total_steps} "
                  "steps; nothing to do")
        return {"output_dir": str(output_dir), "completed_steps": total_steps,
                "final_dir": str(output_dir / checkpoint.FINAL_DIR), "last_metrics": None}
    if env.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial_checkpoints(output_dir)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if sampler.dropped_rows_per_epoch:
            print(f"note: the last {sampler.dropped_rows_per_epoch} pairs of each epoch do not "
                  f"fill a global batch of {cfg.global_batch_size} and are skipped")
    distributed.barrier(env)

    # ---- model and reference ---------------------------------------------------------------
    policy = build_policy(cfg, env)
    if env.is_main and cfg.optim == "adamw" and torch_dtype(cfg.dtype, env.device) != torch.float32:
        print("note: torch AdamW on 16-bit parameters rounds updates smaller than the "
              "parameters' resolution away (most of them at lr ~1e-6); optim adamw_bf16 "
              "rounds stochastically instead")
    reference_model = None
    if not cfg.reference_free and cfg.reference == "precomputed":
        # The policy has not moved yet, so it *is* the reference model for this pass.
        origin = attach_reference_logps(
            examples, policy, collator, env, model_path=cfg.model_name_or_path,
            dtype=torch_dtype(cfg.dtype, env.device), output_dir=output_dir,
            batch_size=cfg.reference_batch_size, progress=cfg.progress_bar)
        if env.is_main:
            print(f"reference log-probs: {origin} ({output_dir / 'reference_logps.pt'})")
    elif not cfg.reference_free:
        reference_model = build_policy(cfg, env, trainable=False)
    margin = None
    if cfg.adaptive_margin:  # gamma-PO; each rank keeps its own queue, as the authors do
        margin = AdaptiveMargin(cfg.margin_mean, cfg.margin_tau, seed=cfg.seed + env.rank,
                                center=cfg.margin_center)

    # ---- optimizer and resume --------------------------------------------------------------
    optimizers = build_optimizers(policy, cfg, env.device)
    grad_sq_sum = attach_step_in_backward(optimizers, env.device) if cfg.step_in_backward else None
    params = [p for p in policy.parameters() if p.requires_grad]
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    window = MetricsWindow()
    resume_from = distributed.broadcast_object(checkpoint.latest_checkpoint(output_dir), env)
    if resume_from is not None:
        trainer_state, rank_state = checkpoint.load_checkpoint(resume_from, policy, optimizers,
                                                               env)
        sampler.load_state_dict(trainer_state["sampler"])
        if sampler.start_step > total_steps:
            raise ValueError(f"{resume_from} is past this run's last step ({total_steps}); "
                             "raise max_steps / num_epochs or use another output_dir")
        window.load_state_dict(rank_state["metrics_window"])
        if margin is not None:
            margin.load_state_dict(rank_state["margin"])
        if env.is_main:
            print(f"resuming from {resume_from} (step {sampler.start_step} of {total_steps})")
    log = MetricsLog(output_dir, env.is_main, sampler.start_step if resume_from else None)

    # ---- the loop --------------------------------------------------------------------------
    policy.train()
    progress = tqdm(total=total_steps, initial=sampler.start_step, desc="train",
                    disable=not (env.is_main and cfg.progress_bar))
    row = None
    for step, micro_batches in sampler:
        lr = cosine_lr(step, total_steps, warmup_steps, cfg.learning_rate)
        set_lr(optimizers, lr)
        for indices in micro_batches:
            batch = collator([examples[i] for i in indices])
            tokens = int(batch["attention_mask"].sum())  # counted on the CPU: no device sync
            batch = {name: tensor.to(env.device) for name, tensor in batch.items()}
            if reference_model is not None:
                ref_logps = reference_model(batch["input_ids"], batch["attention_mask"],
                                            batch["labels"], logps_only=True)
                if env.distributed:
                    reference_model.reshard()  # no backward follows to reshard its root
            elif not cfg.reference_free:
                ref_logps = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
            else:
                ref_logps = None
            loss, out = policy(batch["input_ids"], batch["attention_mask"], batch["labels"],
                               ref_logps=ref_logps, hard=batch.get("hard"), margin=margin)
            # Mean over the global batch: every micro-batch holds the same number of pairs.
            (loss / sampler.accumulation_steps).backward()
            window.add(out, tokens=tokens)

        if grad_sq_sum is not None:  # parameters were already updated inside backward
            grad_norm = grad_sq_sum.sqrt()  # a tensor: read on the host only when logged
            grad_sq_sum.zero_()
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            for optimizer in optimizers:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        done = step + 1
        progress.update(1)

        if done % cfg.logging_steps == 0 or done == total_steps:
            if hasattr(grad_norm, "full_tensor"):  # FSDP2 DTensor (collective: every rank)
                grad_norm = grad_norm.full_tensor()
            row = {"step": done, **window.summarize(env), "lr": lr,
                   "grad_norm": grad_norm.item(),
                   "memory/peak_gb": peak_memory_gb(env.device)}
            log.write(row)
            progress.set_postfix(loss=f"{row['loss']:.4f}",
                                 acc=f"{row['rewards/accuracies']:.2f}")
        if cfg.save_steps and done % cfg.save_steps == 0:
            sampler_state = {**sampler.state_dict(), "start_step": done}
            rank_state = {"metrics_window": window.state_dict(),
                          "margin": None if margin is None else margin.state_dict()}
            checkpoint.save_checkpoint(
                output_dir, done, policy, optimizers,
                {"step": done, "sampler": sampler_state, "world_size": env.world_size,
                 "config": cfg.to_dict()}, rank_state, env, cfg.save_total_limit)
    progress.close()
    log.close()

    final_dir = checkpoint.export_final(
        output_dir, policy, policy.causal_lm, tokenizer,
        {"completed_steps": total_steps, "config": cfg.to_dict()}, env)
    if env.is_main:
        print(f"saved {final_dir}")
    return {"output_dir": str(output_dir), "final_dir": str(final_dir),
            "completed_steps": total_steps, "last_metrics": row}
