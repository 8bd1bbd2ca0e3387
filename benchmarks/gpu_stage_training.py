"""Stage 5 of benchmarks/gpu_check.py (training): a real training run on a ~1B Llama built
from a config, mixpo's trainer (MixDPO + gamma-PO) against trl's DPOTrainer on the same
synthetic data, and mixpo's peak memory against `mixpo plan`. Holds the model and data
builders, build_train_config, and the training workers (_worker_mixpo, _worker_trl) that
gpu_check.run_worker runs in processes of their own. The stage function takes a
`gpu_check_common.StageContext`, fills `ctx.details`, and returns (verdict, one-line headline)."""
from __future__ import annotations

import json
import pathlib
import statistics
import time

import torch

from gpu_check_common import _finish, _free, _start
from harness import stop_workers, sync


def _training_shapes(quick: bool) -> dict:
    if quick:
        return dict(model=dict(vocab_size=1024, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                    words=200, prompt_words=11, completion_words=19, pairs=2, steps=2)
    # Llama-3.2-1B's shape: 1.24 B parameters, tied embeddings.
    return dict(model=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                           num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                           rope_theta=500000.0),
                words=5000, prompt_words=255, completion_words=766, pairs=4, steps=6)


def _build_model_dir(path: pathlib.Path, shape: dict) -> dict:
    """A word-level tokenizer (words w0..wK, <s> prepended, </s> = EOS) and a randomly
    initialised Llama of `shape` (bf16 on CUDA), saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(("<pad>", "<unk>", "<s>", "</s>"))}
    vocab.update({f"w{i}": i + 4 for i in range(shape["words"])})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    length = 2 + shape["prompt_words"] + shape["completion_words"]
    config = LlamaConfig(**shape["model"], max_position_embeddings=max(2048, length),
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3)
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    if cuda:
        model = model.to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    params = sum(p.numel() for p in model.parameters())
    del model
    _free()
    return {"parameters": params, "sequence_tokens": length}


def _write_rows(path: pathlib.Path, shape: dict, count: int) -> None:
    """Synthetic pairs: fixed-length word strings (no padding in any batch), every other pair
    `hard` (MixDPO routing); completions end with the EOS word, start with a space."""
    import random
    rng = random.Random(0)

    def words(count):
        return " ".join(f"w{rng.randrange(shape['words'])}" for _ in range(count))
    with path.open("w") as handle:
        for index in range(count):
            handle.write(json.dumps({
                "prompt": words(shape["prompt_words"]),
                "chosen": " " + words(shape["completion_words"]) + " </s>",
                "rejected": " " + words(shape["completion_words"]) + " </s>",
                "hard": index % 2 == 0}) + "\n")


def build_train_config(overrides: dict):
    """mixpo's TrainConfig through build_config from a small dict. Keys the config does not
    know (fields renamed by later versions) are dropped one at a time and reported, so this
    check survives config changes that do not touch the essentials."""
    from mixpo.train.config import TrainConfig, build_config

    overrides, dropped = dict(overrides), []
    while True:
        try:
            return build_config(TrainConfig, None, overrides), dropped
        except ValueError as error:
            key = next((k for k in overrides if f"unknown config key {k!r}" in str(error)), None)
            if key is None:
                raise
            overrides.pop(key)
            dropped.append(key)


def _worker_mixpo(spec: dict) -> dict:
    from mixpo.train.metrics import read_metrics
    from mixpo.train.trainer import train

    cfg, dropped = build_train_config(spec["overrides"])
    train(cfg)
    rows = read_metrics(cfg.output_dir)
    return {"metrics": rows, "dropped_config_keys": dropped}


def _worker_trl(spec: dict) -> dict:
    """trl's DPOTrainer (its own fused head), sigmoid DPO, reference log-probs precomputed.
    Optional spec keys (benchmarks/bench_train.py sets them; this stage keeps the defaults):
    beta (0.01), learning_rate (1e-6), lr_scheduler_type ("linear"), accumulation (1),
    sampling ("random"; "sequential" reads the file in order, as mixpo's sampler does), seed
    (0), trainer ("trl"; "mixpo": mixpo.integrations.trl's MixpoDPOTrainer, the same run
    with mixpo's fused head inside trl) and padding_free (False; mixpo only). Returns per
    micro-batch the non-padding and the padded token counts, the step times, the peak and
    trl's log history."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    extra = {}
    if spec.get("trainer", "trl") == "mixpo":
        from mixpo.integrations.trl import MixpoDPOConfig as DPOConfig   # noqa: F811
        from mixpo.integrations.trl import MixpoDPOTrainer as DPOTrainer  # noqa: F811
        extra = {"padding_free": spec.get("padding_free", False), "curriculum": False}

    ready, waited = pathlib.Path(spec["ready"]), 0.0   # --quick starts it before the model exists
    while not ready.exists():
        if waited > 600:
            raise TimeoutError(f"{ready} never appeared (the model was not built)")
        time.sleep(0.2)
        waited += 0.2
    cuda = torch.cuda.is_available()
    rows = [json.loads(line) for line in pathlib.Path(spec["train_file"]).read_text().splitlines()]
    dataset = datasets.Dataset.from_list([{k: row[k] for k in ("prompt", "chosen", "rejected")}
                                          for row in rows])
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=torch.bfloat16 if cuda else torch.float32, attn_implementation="sdpa")
    if cuda:
        model = model.cuda()
    stamps, tokens, padded = [], [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync()
            stamps.append(time.perf_counter())

    class CountingTrainer(DPOTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            tokens.append(int(inputs["attention_mask"].sum()))
            # padding_free (mixpo): the forward packs the real tokens into one row
            padded.append(tokens[-1] if spec.get("padding_free")
                          else int(inputs["attention_mask"].numel()))
            return super().training_step(model, inputs, *args, **kwargs)

    args = DPOConfig(output_dir=spec["output_dir"], per_device_train_batch_size=spec["pairs"],
                     gradient_accumulation_steps=spec.get("accumulation", 1),
                     max_steps=spec["steps"], learning_rate=spec.get("learning_rate", 1e-6),
                     lr_scheduler_type=spec.get("lr_scheduler_type", "linear"),
                     beta=spec.get("beta", 0.01), loss_type="sigmoid",
                     logging_steps=1, save_strategy="no", report_to="none", bf16=cuda,
                     gradient_checkpointing=False, max_length=spec["max_length"],
                     precompute_ref_log_probs=True, seed=spec.get("seed", 0), use_cpu=not cuda,
                     train_sampling_strategy=spec.get("sampling", "random"),
                     dataloader_num_workers=0, disable_tqdm=True, **extra)
    trainer = CountingTrainer(model=model, args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[Clock()])
    sync()
    stamps.append(time.perf_counter())
    trainer.train()
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:   # as mixpo's trainer reports it on a CPU: the process's peak RSS
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # Step k's time: from the end of step k-1 (or the start) to the end of step k.
    step_s = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"step_seconds": step_s, "tokens_per_step": tokens, "padded_tokens_per_step": padded,
            "peak_gb": peak, "log_history": trainer.state.log_history}

def stage_training(ctx):
    """A real training run on a ~1B Llama (Llama-3.2-1B's shape, random init, built from a
    config on the GPU and saved with a word-level tokenizer; model vocabulary 128256).

    Data: synthetic pairs of fixed length (1 + 255 prompt + 766 completion + EOS = 1023 tokens,
    so no batch has padding), half of them `hard`. mixpo: its trainer (build_config from a
    small dict) with full-parameter MixDPO (sigmoid, beta 0.01, label smoothing 0.1, routing of
    the hard pairs) and gamma-PO margins (gamma 0.5, tau 10), torch AdamW, bf16, sdpa, no
    gradient checkpointing, reference log-probs precomputed, micro-batch = global batch = 4
    pairs, 6 steps. trl: DPOTrainer (sigmoid, beta 0.01; its fused LM head) with the same model,
    data, batch, optimizer family, precision and precomputed reference. Each runs in its own
    process: tokens/s = non-padding tokens per step / the step's wall time (from the end of the
    previous step), median over the steps after the first; peak = max_memory_allocated over the
    whole process (GiB). Planner: mixpo.train.plan.mixpo_plan for this model and micro-batch
    (adamw, precomputed reference) minus its fixed runtime reserve (the CUDA context is not in
    max_memory_allocated); reported as measured / predicted. --quick: a 2-layer model, 2 steps.
    """
    import shutil
    import tempfile

    shape = _training_shapes(ctx.quick)
    # Models, checkpoints and exports go to a temporary folder (not --out: it travels back).
    work = pathlib.Path(tempfile.mkdtemp(prefix="gpu_check_train_"))
    started = []
    try:
        return _training(ctx, shape, work, started)
    finally:
        stop_workers(started)                 # a worker still running when the stage ends
        shutil.rmtree(work, ignore_errors=True)


def _training(ctx, shape, work, started):
    from mixpo.train import plan

    model_dir, train_file = work / "model", work / "train.jsonl"
    max_length = 3 + shape["prompt_words"] + shape["completion_words"]
    trl_spec = {"model": str(model_dir), "train_file": str(train_file),
                "output_dir": str(work / "trl"), "pairs": shape["pairs"],
                "steps": shape["steps"], "max_length": max_length, "ready": str(work / "ready")}
    # On the GPU the runs go one after the other (each alone on the device); --quick starts
    # trl's worker first (its imports take most of its time) and runs both at once.
    trl_run = _start(ctx, "train_trl", trl_spec, work, started) if ctx.quick else None
    ctx.details["model"] = _build_model_dir(model_dir, shape)
    _write_rows(train_file, shape, shape["pairs"] * shape["steps"])
    (work / "ready").touch()
    ctx.details.update(shape=shape, build_s=round(ctx.elapsed(), 1))
    ctx.save()
    overrides = {"model_name_or_path": str(model_dir), "train_file": str(train_file),
                 "output_dir": str(work / "mixpo"), "max_length": max_length,
                 "max_prompt_length": shape["prompt_words"] + 1, "loss_type": "sigmoid",
                 "beta": 0.01, "label_smoothing": 0.1, "adaptive_margin": True, "gamma": 0.5,
                 "margin_tau": 10.0, "learning_rate": 1e-6, "optim": "adamw",
                 "global_batch_size": shape["pairs"], "per_device_train_batch_size": shape["pairs"],
                 "max_steps": shape["steps"], "logging_steps": 1, "save_steps": 0,
                 "progress_bar": False, "gradient_checkpointing": False,
                 "attn_implementation": "sdpa", "warmup_ratio": 0.0}
    mixpo_run = _start(ctx, "train_mixpo", {"overrides": overrides}, work, started)
    runs = {"mixpo": _finish(ctx, mixpo_run)}
    ctx.details["mixpo"] = runs["mixpo"]
    ctx.save()
    if trl_run is None and ctx.has_time(20):
        trl_run = _start(ctx, "train_trl", trl_spec, work, started)
    runs["trl"] = _finish(ctx, trl_run) if trl_run else {"skipped": "stage time budget"}
    ctx.details["trl"] = runs["trl"]
    ctx.save()

    summary = {}
    mixpo_run = runs["mixpo"]
    if "metrics" in mixpo_run and mixpo_run["metrics"]:
        rows = mixpo_run["metrics"]
        later = rows[1:] or rows
        summary["mixpo"] = {"tokens_per_s": statistics.median(r["tokens_per_second"]
                                                              for r in later),
                            "peak_gb": max(r["memory/peak_gb"] for r in rows),
                            "loss": [r["loss"] for r in rows]}
    trl_run = runs["trl"]
    if "step_seconds" in trl_run and trl_run["step_seconds"]:
        per_step = [t / s for t, s in zip(trl_run["tokens_per_step"], trl_run["step_seconds"])]
        later = per_step[1:] or per_step
        summary["trl"] = {"tokens_per_s": statistics.median(later), "peak_gb": trl_run["peak_gb"]}
    shape_info = plan.model_shape(str(model_dir))
    work = plan.Workload(gpus=1, seq_len=max_length, micro_batch_size=shape["pairs"],
                         gradient_checkpointing=False)
    predicted = plan.mixpo_plan(shape_info, work, optim="adamw", reference="precomputed")
    predicted_gb = (plan.plan_total(plan.peak_phases(shape_info, work, predicted))
                    - plan.RUNTIME_RESERVE_BYTES) / 2**30
    summary["plan"] = {"predicted_gb_without_reserve": predicted_gb,
                       "components_gb": {k: v / 2**30 for k, v in predicted.items()}}
    if "mixpo" in summary and torch.cuda.is_available():
        summary["plan"]["measured_over_predicted"] = summary["mixpo"]["peak_gb"] / predicted_gb
    elif "mixpo" in summary:
        summary["plan"]["note"] = "CPU: the measured peak is the process RSS, not comparable"
    ctx.details["summary"] = summary
    ctx.save()
    if "mixpo" not in summary:
        return "fail", f"mixpo training failed: {mixpo_run.get('error', '?')}"
    ours = summary["mixpo"]
    parts = [f"mixpo {ours['tokens_per_s']:.0f} tok/s, peak {ours['peak_gb']:.2f} GB"]
    if "trl" in summary:
        theirs = summary["trl"]
        parts.append(f"trl {theirs['tokens_per_s']:.0f} tok/s, peak {theirs['peak_gb']:.2f} GB "
                     f"(mixpo: {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x the "
                     f"tokens/s, {ours['peak_gb'] / theirs['peak_gb']:.2f}x the memory)")
    else:
        parts.append(f"trl {trl_run.get('skipped') or trl_run.get('error', '?')}"[:80])
    if "measured_over_predicted" in summary["plan"]:
        parts.append(f"plan {predicted_gb:.2f} GB predicted, measured/predicted "
                     f"{summary['plan']['measured_over_predicted']:.2f}")
    return "pass", "; ".join(parts)
