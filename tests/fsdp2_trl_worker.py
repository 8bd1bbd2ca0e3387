"""Worker for tests/test_integration_trl_distributed.py, run under torchrun (2 processes, gloo).

MixpoDPOTrainer's loss on a model sharded exactly as `accelerate launch` with FSDP2 shards it
(`accelerate.utils.fsdp_utils.fsdp2_prepare_model`: one unit per decoder layer, the embedding,
a [final norm, lm_head] tail unit, the root), against the same loss on the unsharded model with
the gradients averaged over the ranks by hand (what data parallelism must give). accelerate
enables FSDP only on GPUs (on CPU it picks DDP), so the sharding is applied directly to the
model the trainer was built with; the loss code under test is the trainer's own
(`trainer.compute_loss`).

    python -m torch.distributed.run --nproc_per_node 2 fsdp2_trl_worker.py OUT LOSS_TYPE tied|untied

writes one JSON line per rank to OUT.rank<r>.
"""
import copy
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import build_tiny_causal_lm, build_tiny_tokenizer   # noqa: E402
from test_integration_trl import rows                              # noqa: E402

# examples/accelerate/fsdp2.yaml's layout (tests/test_examples.py checks they agree).
FSDP2_LAYOUT = {"fsdp_version": 2, "auto_wrap_policy": "transformer_based_wrap",
                "reshard_after_forward": True}


def main(out_path: str, loss_type: str, tied: bool) -> None:
    import datasets
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.tensor import DTensor

    import mixpo.integrations.trl_head as head
    from mixpo.integrations.trl import MixpoDPOConfig, MixpoDPOTrainer

    seen = []                        # what the loss's head read: DTensor shards or a tensor
    full = head.full
    head.full = lambda tensor: seen.append(type(tensor).__name__) or full(tensor)

    torch.set_num_threads(1)
    dist.init_process_group("gloo")          # accelerate finds it and uses it
    data = rows()
    tokenizer = build_tiny_tokenizer([value for row in data for value in row.values()
                                      if isinstance(value, str)], chat_template=False)
    model = build_tiny_causal_lm(tokenizer, seed=0, tie_word_embeddings=tied).train()
    args = MixpoDPOConfig(output_dir=out_path + ".run", per_device_train_batch_size=4,
                          max_steps=1, save_strategy="no", report_to="none", seed=0,
                          use_cpu=True, max_length=64, bf16=False, dataloader_num_workers=0,
                          loss_type=[loss_type], precompute_ref_log_probs=True,
                          route_below=0.5, adaptive_margin=True,
                          order="as-is")          # the file's order: its first batch has a tie
    # From disk, as real datasets are: trl 1.16 caches precomputed reference log-probs next to
    # the dataset's files, and an in-memory dataset's cache is a per-process temporary folder
    # (the other rank would not find it).
    folder = out_path + ".data"
    if dist.get_rank() == 0:
        datasets.Dataset.from_list(data).save_to_disk(folder)
    dist.barrier()
    trainer = MixpoDPOTrainer(model=model, args=args, train_dataset=datasets.load_from_disk(
        folder), processing_class=tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    plain = trainer.accelerator.unwrap_model(trainer.model)
    sharded = copy.deepcopy(plain)

    # The unsharded reference: this rank's loss, gradients averaged over ranks (DDP's rule).
    margin_state = trainer._margin.state_dict()
    plain.zero_grad(set_to_none=True)
    plain_loss = trainer.compute_loss(plain, batch)
    plain_loss.backward()
    plain_grads = {}
    for name, param in plain.named_parameters():
        grad = param.grad.clone()
        dist.all_reduce(grad)
        plain_grads[name] = grad / dist.get_world_size()

    # The same step through accelerate's FSDP2 layout.
    plugin = FullyShardedDataParallelPlugin(
        **FSDP2_LAYOUT, transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        cpu_ram_efficient_loading=False)
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin),
                                  torch_device_mesh=None, mixed_precision="no",
                                  device=torch.device("cpu"), parallelism_config=None,
                                  is_main_process=dist.get_rank() == 0)
    sharded = fsdp2_prepare_model(accelerator, sharded)
    seen.clear()
    trainer._margin.load_state_dict(margin_state)          # the same gamma-PO queue state
    sharded_loss = trainer.compute_loss(sharded, batch)
    sharded_loss.backward()
    errors = {}
    for name, param in sharded.named_parameters():
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        reference = plain_grads[name.replace("_fsdp_wrapped_module.", "")]
        errors[name] = ((grad - reference).abs().max() / reference.abs().max()).item()
    head = sharded.get_output_embeddings().weight
    result = {"rank": dist.get_rank(), "loss_type": loss_type, "tied": tied,
              "plain_loss": plain_loss.item(), "sharded_loss": sharded_loss.item(),
              "head_is_sharded": isinstance(head, DTensor),
              "max_grad_error": max(errors.values()), "worst": max(errors, key=errors.get),
              "grads": len(errors), "head_weight_in_forward": seen[0],
              "routed": int(batch["hard"].sum())}
    with open(f"{out_path}.rank{dist.get_rank()}", "w") as handle:
        handle.write(json.dumps(result) + "\n")


def train(out_path: str, resume: bool) -> None:
    """A short MixDPO + gamma-PO run with checkpoints through the trainer's own loop, global
    batch 4 over however many processes (data parallel over gloo); `resume` restarts from
    checkpoint-2 of the same output directory. Rank 0 writes the log history to
    OUT.{train,resume}.json."""
    import datasets

    from mixpo.integrations.trl import MixpoDPOConfig, MixpoDPOTrainer

    torch.set_num_threads(1)
    data = rows()
    tokenizer = build_tiny_tokenizer([value for row in data for value in row.values()
                                      if isinstance(value, str)], chat_template=False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = MixpoDPOConfig(output_dir=out_path, per_device_train_batch_size=4 // world_size,
                          max_steps=4, save_steps=2, logging_steps=1, report_to="none", seed=0,
                          use_cpu=True, max_length=64, bf16=False, dataloader_num_workers=0,
                          learning_rate=1e-3, route_below=0.5, adaptive_margin=True, gamma=0.5)
    trainer = MixpoDPOTrainer(model=build_tiny_causal_lm(tokenizer, seed=0).train(),
                              ref_model=build_tiny_causal_lm(tokenizer, seed=0), args=args,
                              train_dataset=datasets.Dataset.from_list(data),
                              processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=os.path.join(out_path, "checkpoint-2") if resume
                  else None)
    if trainer.is_world_process_zero():
        with open(f"{out_path}.{'resume' if resume else 'train'}.json", "w") as handle:
            json.dump({"log_history": trainer.state.log_history,
                       "world_size": trainer.args.world_size}, handle)


if __name__ == "__main__":
    if sys.argv[2] in ("train", "resume"):
        train(sys.argv[1], resume=sys.argv[2] == "resume")
    else:
        main(sys.argv[1], sys.argv[2], sys.argv[3] == "tied")
    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(0)
