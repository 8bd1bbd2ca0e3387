"""`mixpo train | demo | export | plan`: argparse parsers only; handlers import the heavy modules.

Every field of the run's config dataclass (mixpo.train.config.TrainConfig, or DemoConfig for
the demo) is a `--key VALUE` option, so an unknown key is refused by argparse by name and
`--help` lists every key with its documentation.
"""
from __future__ import annotations

import argparse

TRAIN_EXAMPLES = """examples:
  mixpo train recipes/mixdpo-llama3-8b-base.yaml --model_name_or_path ./Llama-3-8B-SFT \\
      --train_file prepared.jsonl --output_dir runs/mixdpo
  torchrun --nproc_per_node 8 -m mixpo train recipes/mixdpo-llama3-8b-base.yaml ...
  (rerun the same command to resume from the latest complete checkpoint)
"""


def _train(args) -> int:
    from mixpo.train.config import TrainConfig, build_config, overrides_from_args
    from mixpo.train.trainer import train

    train(build_config(TrainConfig, args.config, overrides_from_args(args, TrainConfig)))
    return 0


def _demo(args) -> int:
    from mixpo.train.config import build_config, overrides_from_args
    from mixpo.train.demo import DemoConfig, run_demo

    run_demo(build_config(DemoConfig, None, overrides_from_args(args, DemoConfig)))
    return 0


def _export(args) -> int:
    from mixpo.train.export import export_checkpoint

    print(f"saved {export_checkpoint(args.checkpoint, args.output, args.device)}")
    return 0


def _plan(args) -> int:
    from mixpo.train.plan import plan_command

    print(plan_command(args))
    return 0


def register(subparsers) -> None:
    # Both config modules import only the standard library at module level.
    from mixpo.train.config import OPTIMIZERS, REFERENCES, TrainConfig, add_config_arguments
    from mixpo.train.demo import DemoConfig
    from mixpo.train.plan import KNOWN_SHAPES

    train = subparsers.add_parser(
        "train", help="full-parameter MixDPO / Selective DPO / gamma-PO / DPO / SimPO training",
        description="Train from a YAML recipe; any config key can be overridden as --key VALUE.",
        usage="%(prog)s CONFIG.yaml [--key VALUE ...]", epilog=TRAIN_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)
    train.add_argument("config", metavar="CONFIG.yaml", help="recipe (see recipes/)")
    add_config_arguments(train, TrainConfig)
    train.set_defaults(func=_train)

    demo = subparsers.add_parser(
        "demo", help="end-to-end MixDPO + gamma-PO on a tiny model and a checkable task",
        description="Builds a tiny Llama-style model and a character tokenizer, SFT-warms it on "
        "additions, trains MixDPO with adaptive margins on synthetic preference pairs, and "
        "prints accuracy before/after. Any demo config key can be overridden as --key VALUE.",
        usage="%(prog)s [--key VALUE ...]", allow_abbrev=False)
    add_config_arguments(demo, DemoConfig)
    demo.set_defaults(func=_demo)

    export = subparsers.add_parser(
        "export", help="an intermediate checkpoint as a Hugging Face model directory",
        description="Rebuilds the run's model from CHECKPOINT (torch.distributed.checkpoint "
        "format) and writes it with save_pretrained (safetensors) plus the tokenizer, "
        "loadable by AutoModelForCausalLM.from_pretrained.", allow_abbrev=False)
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="OUTPUT/checkpoint-N")
    export.add_argument("-o", "--output", required=True, metavar="DIR")
    export.add_argument("--device", default="cpu", help="where to rebuild the model")
    export.set_defaults(func=_export)

    plan = subparsers.add_parser(
        "plan", help="GPU memory plan per component, mixpo vs a TRL-default setup",
        description="Estimate memory per GPU (weights, gradients, optimizer states, "
        "activations, loss head, reference) and whether training fits.", allow_abbrev=False)
    plan.add_argument("--model", required=True, metavar="NAME_OR_CONFIG",
                      help="config.json, a model directory, or one of "
                      + ", ".join(KNOWN_SHAPES))
    plan.add_argument("--gpus", type=int, default=1, help="GPUs sharing the model (FSDP)")
    plan.add_argument("--gpu-memory", type=float, default=80.0, metavar="GB",
                      help="memory per GPU in GiB, default 80")
    plan.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence")
    plan.add_argument("--micro-batch-size", type=int, default=1,
                      help="pairs per forward on one GPU (both setups)")
    plan.add_argument("--global-batch-size", type=int, default=128,
                      help="pairs per optimizer step (default 128, the papers' setting)")
    plan.add_argument("--optim", choices=OPTIMIZERS,
                      default="adamw_bf16", help="mixpo optimizer (default adamw_bf16)")
    plan.add_argument("--step-in-backward", action="store_true",
                      help="update each parameter inside backward (needs --gpus 1 and "
                      "--global-batch-size = --micro-batch-size)")
    plan.add_argument("--reference", choices=REFERENCES,
                      default="precomputed")
    plan.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing",
                      action="store_false")
    plan.add_argument("--measure", action="store_true",
                      help="also run the planned step on fake tensors (no GPU, no memory) "
                      "under torch's memory tracker and print the measured peak beside the "
                      "plan (minutes for an 8B model on a CPU)")
    plan.add_argument("--head-workspace-mib", type=int, default=None, metavar="MIB",
                      help="the logit-free head's workspace budget (default 256 MiB, "
                      "mixpo.kernels.configs.DEFAULT_WORKSPACE_BYTES)")
    plan.set_defaults(func=_plan)
