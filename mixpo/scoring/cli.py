"""`mixpo data score-validation | score-reward | score-embedding`: model-based difficulty
columns, and `prepare --embedding-model DIR`.

Registered into the `data` command group (`mixpo.data.cli.register` returns it); argparse
parsers only, each handler imports the scoring code it runs. The data layer cannot import
scoring, so `register` also adds the embedding options to `data prepare` and wraps its
handler: with --embedding-model the `embedding_distance` column is computed first, then the
ordinary prepare step (`mixpo.data.cli.prepare_transform`) runs on the scored rows.
"""
from __future__ import annotations

import argparse

from mixpo.data.cli import add_input, handle_prepare, prepare_transform, rewrite
from mixpo.scoring import LORA_TARGET_MODULES

DTYPES = ("float32", "bfloat16", "float16")


def _handle_score_reward(args: argparse.Namespace) -> int:
    from mixpo.scoring.reward import (check_reward_settings, load_reward_model,
                                      score_with_reward_model)

    check_reward_settings(args.batch_size, args.max_length, args.device)  # before any loading

    def transform(dataset, row_names):
        model, tokenizer = load_reward_model(args.model, device=args.device, dtype=args.dtype)
        scored = score_with_reward_model(dataset, model, tokenizer, batch_size=args.batch_size,
                                         max_length=args.max_length, row_names=row_names)
        positive = sum(c > r for c, r in zip(scored["reward_chosen"], scored["reward_rejected"]))
        return scored, (f"score-reward: {len(scored)} pairs scored with {args.model}; "
                        f"reward margin > 0 for {positive}")

    return rewrite(args, transform)


def _comma_list(text: str, option: str, kind=str) -> tuple:
    """'a, b,c' -> ('a', 'b', 'c') (each converted by `kind`); ValueError naming `option`."""
    try:
        return tuple(kind(item.strip()) for item in text.split(",") if item.strip())
    except ValueError:
        what = "integers" if kind is int else "values"
        raise ValueError(f"{option} takes comma-separated {what}, got {text!r}") from None


def _handle_score_validation(args: argparse.Namespace) -> int:
    from mixpo.scoring.validation import ValidationSettings, score_validation_loss

    settings = ValidationSettings(
        folds=args.folds, seeds=_comma_list(args.seeds, "--seeds", int), evals=args.evals,
        beta=args.beta, learning_rate=args.lr, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, epochs=args.epochs,
        warmup_ratio=args.warmup_ratio, full_parameter=args.full_parameter,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_target_modules=_comma_list(args.lora_target_modules, "--lora-target-modules"),
        max_length=args.max_length, max_prompt_length=args.max_prompt_length, dtype=args.dtype,
        device=args.device)
    settings.check_options()  # before any loading

    def transform(dataset, row_names):
        scored, summary = score_validation_loss(dataset, args.model, settings, row_names=row_names)
        return scored, summary.line()

    return rewrite(args, transform)


def _embedding_cache(args: argparse.Namespace) -> tuple[str | None, bool]:
    """(cache directory or None for the default, whether to use a cache)."""
    if args.embedding_cache == "none":
        return None, False
    return args.embedding_cache, True


def _handle_score_embedding(args: argparse.Namespace) -> int:
    from mixpo.hf.loading import check_device
    from mixpo.scoring.embedding import score_embedding_distance

    check_device(args.device)  # before any loading
    cache_dir, use_cache = _embedding_cache(args)

    def transform(dataset, row_names):
        scored, summary = score_embedding_distance(
            dataset, args.embedding_model, batch_size=args.batch_size, device=args.device,
            cache_dir=cache_dir, use_cache=use_cache, row_names=row_names)
        return scored, summary.line()

    return rewrite(args, transform)


def _handle_prepare(args: argparse.Namespace) -> int:
    """`data prepare`, with the embedding distance computed first under --embedding-model."""
    if args.embedding_model is None:
        return handle_prepare(args)
    if args.difficulty != "embedding":
        raise ValueError(f"--embedding-model is used by --difficulty embedding only (this run "
                         f"scores by {args.difficulty})")
    from mixpo.hf.loading import check_device
    from mixpo.scoring.embedding import score_embedding_distance

    check_device(args.embedding_device, "--embedding-device")  # before any loading
    cache_dir, use_cache = _embedding_cache(args)
    prepare = prepare_transform(args)

    def transform(dataset, row_names):
        scored, summary = score_embedding_distance(
            dataset, args.embedding_model, batch_size=args.embedding_batch_size,
            device=args.embedding_device, cache_dir=cache_dir, use_cache=use_cache,
            row_names=row_names)
        prepared, line = prepare(scored, row_names)
        return prepared, f"{summary.line()}\n{line}"

    return rewrite(args, transform)


def _add_embedding_cache(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embedding-cache", metavar="DIR",
                        help="where embeddings are cached, keyed by model and text (default: "
                        "$MIXPO_CACHE_DIR/embeddings or ~/.cache/mixpo/embeddings); 'none' "
                        "embeds everything and caches nothing")


def _register_validation(commands) -> None:
    validation = commands.add_parser(
        "score-validation", help="Selective DPO difficulty: held-out DPO loss of reference models",
        description="Selective DPO (glorgao/SelectiveDPO): drops pairs whose chosen equals "
        "rejected, trains LoRA reference models (seeds x halves) with DPO on one half and "
        "scores the other half --evals times during training; a pair's `validation_loss` is "
        "the mean of its scores. Defaults are the authors' UltraFeedback settings.")
    add_input(validation)
    validation.add_argument("--model", required=True, help="causal LM (local path or Hub name)")
    validation.add_argument("--folds", type=int, default=2, help="data parts (default 2: halves)")
    validation.add_argument("--seeds", default="41,42,43", help="split/training seeds")
    validation.add_argument("--evals", type=int, default=5,
                            help="scorings of the held-out part per reference model, every "
                            "total_steps // evals steps (default 5)")
    validation.add_argument("--beta", type=float, default=0.01)
    validation.add_argument("--lr", type=float, default=3e-5,
                            help="peak learning rate, cosine schedule (default 3e-5, the "
                            "authors' LoRA rate; their Qwen-2.5 runs use 6e-6)")
    validation.add_argument("--warmup-ratio", type=float, default=0.1)
    validation.add_argument("--batch-size", type=int, default=512,
                            help="effective batch: pairs per optimizer step, accumulated over "
                            "--micro-batch-size passes (default 512, the authors'; lower it "
                            "for small data)")
    validation.add_argument("--micro-batch-size", type=int, default=8,
                            help="pairs per forward/backward pass (gradient accumulation)")
    validation.add_argument("--epochs", type=int, default=1)
    validation.add_argument("--full-parameter", action="store_true",
                            help="train whole-model reference models instead of LoRA adapters")
    validation.add_argument("--lora-r", type=int, default=16)
    validation.add_argument("--lora-alpha", type=int, default=16)
    validation.add_argument("--lora-dropout", type=float, default=0.05)
    validation.add_argument("--lora-target-modules", default=",".join(LORA_TARGET_MODULES),
                            help="comma-separated module names; those the model has are "
                            "adapted (default: %(default)s)")
    validation.add_argument("--max-length", type=int, default=1024)
    validation.add_argument("--max-prompt-length", type=int, default=512,
                            help="prompt tokens kept (its end) when a pair is too long")
    validation.add_argument("--dtype", choices=DTYPES, default="float32")
    validation.add_argument("--device", default="cpu")
    validation.set_defaults(func=_handle_score_validation)


def register(commands) -> None:
    """Add the score-* sub-commands to the `data` group's subparsers, and the embedding
    options to its `prepare` command."""
    _register_validation(commands)

    reward = commands.add_parser("score-reward", help="reward-model scores of chosen/rejected")
    add_input(reward)
    reward.add_argument("--model", required=True, help="sequence-classification reward model")
    reward.add_argument("--batch-size", type=int, default=8)
    reward.add_argument("--max-length", type=int, help="truncate from the left to this length")
    reward.add_argument("--device", default="cpu")
    reward.add_argument("--dtype", choices=DTYPES)
    reward.set_defaults(func=_handle_score_reward)

    embedding = commands.add_parser(
        "score-embedding", help="MixDPO difficulty: embedding distance of the two responses",
        description="Adds `embedding_distance`: 1 - cosine similarity of the mean-pooled, "
        "L2-normalised embeddings of the chosen and the rejected response (responses only, "
        "MixDPO section 6); bigger = easier. Then `prepare --difficulty embedding`.")
    add_input(embedding)
    embedding.add_argument("--embedding-model", metavar="DIR", required=True,
                           help="local sentence-transformers model directory (the authors: "
                           "BAAI/bge-large-en-v1.5)")
    embedding.add_argument("--batch-size", type=int, default=32, metavar="N",
                           help="texts per encode call (default 32)")
    embedding.add_argument("--device", default="cpu")
    _add_embedding_cache(embedding)
    embedding.set_defaults(func=_handle_score_embedding)

    prepare = commands.choices["prepare"]
    prepare.add_argument("--embedding-model", metavar="DIR",
                         help="with --difficulty embedding: compute `embedding_distance` with "
                         "this local sentence-transformers model first (as score-embedding)")
    prepare.add_argument("--embedding-batch-size", type=int, default=32, metavar="N",
                         help="texts per encode call for --embedding-model")
    prepare.add_argument("--embedding-device", default="cpu", metavar="DEVICE",
                         help="device for --embedding-model (default: cpu)")
    _add_embedding_cache(prepare)
    prepare.set_defaults(func=_handle_prepare)
