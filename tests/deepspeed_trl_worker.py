"""Worker for tests/test_integration_trl_distributed.py: MixpoDPOTrainer and stock trl 1.16
DPOTrainer under the same DeepSpeed configuration, run under torchrun (2 CPU processes, gloo,
DeepSpeed's CPU accelerator), each training 2 steps from the same tiny model and data.

    python -m torch.distributed.run --nproc_per_node 2 deepspeed_trl_worker.py OUT

Cases: ZeRO-3 with an untied and a tied head, each with a live and a precomputed reference,
and ZeRO-2 once. ZeRO-3 partitions every parameter (`stage3_param_persistence_threshold: 0`:
a tiny model's would otherwise all stay whole), so the LM head is 0 elements outside its
gathers. Rank 0 writes OUT.json: per case and trainer, the logged losses and grad norms and
whether the head was partitioned after training.
"""
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import build_tiny_causal_lm, build_tiny_tokenizer   # noqa: E402
from test_integration_trl import rows                              # noqa: E402

CASES = [("zero3", "untied", "live"), ("zero3", "tied", "live"),
         ("zero3", "untied", "precomputed"), ("zero3", "tied", "precomputed"),
         ("zero2", "untied", "live")]


def deepspeed_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"}}


def run(name, stage, tied, reference, tokenizer, data_folder, out_path) -> dict:
    import datasets
    import trl

    from mixpo.integrations.trl import MixpoDPOConfig, MixpoDPOTrainer

    mixpo = name == "mixpo"
    config_class, trainer_class = (MixpoDPOConfig, MixpoDPOTrainer) if mixpo else \
        (trl.DPOConfig, trl.DPOTrainer)
    args = config_class(output_dir=f"{out_path}.{name}", per_device_train_batch_size=2,
                        max_steps=2, logging_steps=1, save_strategy="no", report_to="none",
                        seed=0, use_cpu=True, bf16=False, max_length=64, learning_rate=1e-3,
                        beta=0.3, dataloader_num_workers=0, deepspeed=deepspeed_config(stage),
                        precompute_ref_log_probs=reference == "precomputed",
                        **({"curriculum": False} if mixpo else {}))
    tie = {"tie_word_embeddings": tied == "tied"}
    model = build_tiny_causal_lm(tokenizer, seed=0, **tie).train()
    ref_model = build_tiny_causal_lm(tokenizer, seed=0, **tie) if reference == "live" else None
    trainer = trainer_class(model=model, ref_model=ref_model, args=args,
                            train_dataset=datasets.load_from_disk(data_folder),
                            processing_class=tokenizer)
    trainer.train()
    head = trainer.accelerator.unwrap_model(trainer.model).get_output_embeddings().weight
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {"losses": [entry["loss"] for entry in logged],
              "grad_norms": [entry["grad_norm"] for entry in logged],
              "head_partitioned": head.numel() == 0 and getattr(head, "ds_numel", 0) > 0}
    del trainer, model, ref_model
    gc.collect()
    return result


def main(out_path: str) -> None:
    import datasets
    import deepspeed.comm.torch

    # DeepSpeed's CPU backend JIT-compiles a shared-memory allreduce (about 40 s on 2 cores,
    # once per machine); gloo's allreduce is what these 2-process checks need.
    deepspeed.comm.torch.build_shm_op = lambda: None
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    data = rows()
    tokenizer = build_tiny_tokenizer([value for row in data for value in row.values()
                                      if isinstance(value, str)], chat_template=False)
    results = {}
    for stage, tied, reference in CASES:
        case = f"{stage}-{tied}-{reference}"
        for name in ("stock", "mixpo"):
            # From disk (a precomputed reference over several processes needs it), one copy
            # per run: trl caches reference log-probs next to the files, keyed by the model.
            folder = f"{out_path}.data.{case}.{name}"
            if dist.get_rank() == 0:
                datasets.Dataset.from_list(data).save_to_disk(folder)
            dist.barrier()
            results[f"{case}.{name}"] = run(name, int(stage[-1]), tied, reference, tokenizer,
                                            folder, f"{out_path}.{case}")
    if dist.get_rank() == 0:
        Path(f"{out_path}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(0)
