"""`mixpo data score-validation | score-reward`: model-based difficulty columns.

Registered into the `data` command group (`mixpo.data.cli.register` returns it); argparse
parsers only, each handler imports the scoring code it runs.
"""
from __future__ import annotations

import argparse

from mixpo.data.cli import add_input, rewrite


def _handle_score_reward(args: argparse.Namespace) -> int:
    from mixpo.scoring.reward import load_reward_model, score_with_reward_model

    def transform(dataset, row_names):
        model, tokenizer = load_reward_model(args.model, device=args.device, dtype=args.dtype)
        scored = score_with_reward_model(dataset, model, tokenizer, batch_size=args.batch_size,
                                         max_length=args.max_length, row_names=row_names)
        positive = sum(c > r for c, r in zip(scored["reward_chosen"], scored["reward_rejected"]))
        return scored, (f"score-reward: {len(scored)} pairs scored with {args.model}; "
                        f"reward margin > 0 for {positive}")

    return rewrite(args, transform)


def _handle_score_validation(args: argparse.Namespace) -> int:
    from mixpo.scoring.validation import ValidationSettings, score_validation_loss

    try:
        seeds = tuple(int(seed) for seed in args.seeds.split(",") if seed.strip())
    except ValueError:
        raise ValueError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    settings = ValidationSettings(
        folds=args.folds, seeds=seeds, evals=args.evals, beta=args.beta, learning_rate=args.lr,
        batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, epochs=args.epochs,
        max_length=args.max_length, max_prompt_length=args.max_prompt_length, dtype=args.dtype,
        device=args.device)

    def transform(dataset, row_names):
        scored, summary = score_validation_loss(dataset, args.model, settings, row_names=row_names)
        return scored, summary.line()

    return rewrite(args, transform)


def register(commands) -> None:
    """Add the score-* sub-commands to the `data` group's subparsers."""
    validation = commands.add_parser(
        "score-validation", help="Selective DPO difficulty: held-out DPO loss of reference models")
    add_input(validation)
    validation.add_argument("--model", required=True, help="causal LM (local path or Hub name)")
    validation.add_argument("--folds", type=int, default=2, help="data parts (default 2: halves)")
    validation.add_argument("--seeds", default="41,42,43", help="split/training seeds")
    validation.add_argument("--evals", type=int, default=5,
                            help="scorings of the held-out part per reference model")
    validation.add_argument("--beta", type=float, default=0.01)
    validation.add_argument("--lr", type=float, default=1e-6)
    validation.add_argument("--batch-size", type=int, default=64, help="pairs per optimizer step")
    validation.add_argument("--micro-batch-size", type=int, default=8,
                            help="pairs per forward/backward pass (gradient accumulation)")
    validation.add_argument("--epochs", type=int, default=1)
    validation.add_argument("--max-length", type=int, default=1024)
    validation.add_argument("--max-prompt-length", type=int, default=512,
                            help="prompt tokens kept (its end) when a pair is too long")
    validation.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                            default="float32")
    validation.add_argument("--device", default="cpu")
    validation.set_defaults(func=_handle_score_validation)

    reward = commands.add_parser("score-reward", help="reward-model scores of chosen/rejected")
    add_input(reward)
    reward.add_argument("--model", required=True, help="sequence-classification reward model")
    reward.add_argument("--batch-size", type=int, default=8)
    reward.add_argument("--max-length", type=int, help="truncate from the left to this length")
    reward.add_argument("--device", default="cpu")
    reward.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    reward.set_defaults(func=_handle_score_reward)
