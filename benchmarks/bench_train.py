"""Training throughput and peak memory, side by side in one run: mixpo's trainer padded, mixpo's
trainer packed (`padding_free: true`), trl 1.16's DPOTrainer and the same trl loop with mixpo's
head (MixpoDPOTrainer, padded and padding-free), on the same model, the same
data, the same global batch and the same number of steps (issue 14).

Model: a Llama built locally from a LlamaConfig (random init, tied embeddings, GQA with 4
query heads per KV head, MLP 4 x H) and saved with a word-level tokenizer (words w0..wK,
`<s>` prepended, `</s>` = EOS; gpu_stage_training._build_model_dir). The issue's shape is 4
layers, H 512, V 128256 (Llama-3's vocabulary: the LM head is most of the FLOPs and of the
logits memory, which is what a fused head is about); on a GPU that is the default. On a CPU
the default is 2 layers, H 256, V 128256 and the lengths scaled by 0.25, so that the three
runs finish in a few minutes on 2 cores; `--layers 4 --hidden 512 --length-scale 1` is the
full shape anywhere.

Data (UltraFeedback-like): prompt and completion lengths in tokens (BOS counted in the prompt,
EOS in each completion) drawn from log-normal distributions, chosen and rejected independently,
a draw past its cap drawn again (so neither trainer truncates anything):
    prompt      median 100 tokens, sigma 0.9  (mean ~150, p99 ~810), at most 512
    completion  median 250 tokens, sigma 0.6  (mean ~300, p99 ~1010), at most 1024 - prompt
Why these: HuggingFaceH4/ultrafeedback_binarized (Llama-3 tokens) has mostly short prompts
(questions from UltraChat, ShareGPT, FLAN, Evol-Instruct, TruthfulQA, FalseQA) with a long right
tail of pasted documents and code, and completions of a few hundred tokens with a tail past
1000, which the usual max_length 1024 / max_prompt_length 512 (TRL's defaults) cut. A
log-normal has that shape (lengths are products of many factors; a heavy right tail). The
medians and sigmas are set by hand to rough figures for that dataset (prompts: median ~100,
mean ~1.5x the median; completions: median ~250, mean ~300, about 1% past 1000): an estimate,
not a fit, since nothing is read from the dataset here (no network); `--prompt-median` etc.
change them. The token ids are random words.
`--length-scale s` multiplies the medians and both caps by s (same sigmas, same shape of the
distribution, so the same padding share to first order).

Configurations, each in its own subprocess (so peak memory is the run's own), run one after
the other (`--jobs` > 1 runs them at once: for tests only, the timings then contend):
  mixpo_padded   mixpo.train.trainer.train, PreferenceCollator (rows padded to the longest of
                 the micro-batch), attention sdpa.
  mixpo_packed   the same with padding_free: true (PackedPreferenceCollator: one row per
                 micro-batch, no pad token); attention "auto": flash_attention_2 varlen on a
                 GPU when flash-attn is importable, else sdpa with a block-diagonal mask.
  trl            trl 1.16's DPOTrainer. Its fused LM head has no switch: DPOTrainer.__init__
                 always calls trl.trainer.utils.add_fused_lm_head (chunked log-probs, logits
                 never materialised; DPOConfig.use_liger_kernel is deprecated and Liger's
                 fused_linear_cross_entropy is refused because it would replace that head).
                 On CUDA/XPU it scores only the completion positions; elsewhere (this CPU) it
                 scores every position, prompt and padding included, and it always computes
                 entropy, mean logits and top-1 for its metrics. DPOConfig.padding_free falls
                 back to padding in 1.16, so trl runs padded. Attention sdpa.
  mixpo_in_trl   trl's DPOTrainer loop with mixpo's head: mixpo.integrations.trl's
                 MixpoDPOTrainer (two names changed, curriculum off so it samples as trl does),
                 padded; mixpo_in_trl_packed with its padding_free (mixpo packs trl's padded
                 batch inside the forward, sdpa with a block-diagonal mask).
All of them: sigmoid DPO (beta 0.1), reference log-probs precomputed before training (no
reference model in memory), torch AdamW, constant learning rate 1e-4 without warm-up (large
enough that the loss moves in a few steps, so the trajectories can be compared), max_grad_norm
1, no gradient checkpointing, seed 0, the data read in file order (mixpo's sampler never
shuffles; trl runs train_sampling_strategy "sequential"), so step k sees the same pairs in every
configuration. fp32 on a CPU; bf16 weights on a GPU (mixpo dtype auto, trl bf16).

Measurement, inside each worker: a global torch optimizer step post-hook (the same for both
trainers) stamps the end of every optimizer step (after a CUDA synchronize). Step 1 is the
warm-up and is excluded: tokens/s = real tokens of steps 2..N / (end of step N - end of step 1).
Real tokens = prompt + completion tokens of the chosen and the rejected sequence of every pair in
those steps, padding excluded: the same numerator for all three, computed from the data and
checked against what each worker's batches held. Peak memory: on CUDA
torch.cuda.max_memory_allocated at the end of step N (reset after the imports); on a CPU the
resident-set high-water mark at the end of step N above the RSS after the worker's imports
(VmHWM, reset through /proc/self/clear_refs; mixpo's final export and trl's exit come later
and are not counted). The imports before the baseline are each trainer's stack plus the model
classes both load lazily (transformers' Llama code alone is ~200 MB of RSS), so library code is
not counted as training memory. Both numbers include the weights, gradients, AdamW states and
the reference pass; `model_state_mib` (weights + gradients + two Adam moments, all in the
weights' dtype, as torch AdamW keeps them) is reported beside it because on a small model it is
a large part of the peak. On a CPU the RSS also holds allocator slack (glibc keeps freed pages):
the number is what the process held.

Timings on a shared CPU move with whatever else runs (steps of the same batch were seen to vary
2-3x on a 2-core machine with other jobs): `--rounds R` runs every configuration R times (order
reversed every other round) and keeps each one's fastest round, listing all of them. The report
also carries `flop_estimate`: the matmul FLOPs each configuration has to do in the timed steps
(6 x parameters x tokens; body over the positions it runs, LM head over the positions it
scores), which says what ratio to expect: with V 128256 and a small body the LM head is most of
the work, and it scores the same completion tokens padded or packed in mixpo, so packing gains
only the body's padding share there; trl on a CPU scores every padded position.

Reported: tokens/s and peak memory of each configuration, ratios vs trl (speedup, memory
ratio) and the issue's goal (mixpo packed >= 1.5x trl's tokens/s and <= 0.5x its peak), the pad
fraction of the padded runs (padding / padded batch tokens) and the loss and log-probs of every
step: mixpo padded and packed must agree (the same math), and trl vs mixpo padded should agree
closely (same sigmoid DPO, same precomputed reference; at step 1 the policy is the reference so
every loss is log 2; steps 2..N test the gradients and the optimizer as well).

    python benchmarks/bench_train.py                    # defaults for this device
    python benchmarks/bench_train.py --layers 4 --hidden 512 --length-scale 1 --steps 6
Writes benchmarks/results/train_<cpu|cuda>.json and a PNG plot beside it (`--out`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import shutil
import sys
import tempfile
import time

from bench_train_report import (BASELINE, CONFIGS, TRL_LOOP, _length_stats, _print_summary,
                                flop_estimate, notes, plot, summarise)
from harness import (MIB, RESULTS, PeakMemory, child_env, device_name, finish_worker,
                     start_worker, sync, versions, write_json, write_report)

PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets", "triton", "flash-attn")
SCRIPT = pathlib.Path(__file__).resolve()
READY = "READY"          # written into the work folder once the model and the data exist


# ----------------------------------------------------------------------------------------------
# Data: UltraFeedback-like lengths, random words
# ----------------------------------------------------------------------------------------------
def length_distribution(args) -> dict:
    """The length distribution of this run (tokens; the caps scaled with the medians)."""
    scale = args.length_scale
    return {"kind": "log-normal (median, sigma), drawn within the caps",
            "prompt_median": args.prompt_median * scale, "prompt_sigma": args.prompt_sigma,
            "completion_median": args.completion_median * scale,
            "completion_sigma": args.completion_sigma,
            "max_prompt_length": max(2, round(args.max_prompt_length * scale)),
            "max_length": max(4, round(args.max_length * scale)),
            "length_scale": scale, "seed": args.seed}


def draw_lengths(count: int, dist: dict, seed: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of `count` pairs: prompt >= 2 (BOS + a word),
    completions >= 2 (a word + EOS), prompt <= max_prompt_length, prompt + completion <=
    max_length. A draw past a cap is redrawn (so no trainer truncates anything)."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def draw(median, sigma, low, high):
        while True:
            value = int(round(rng.lognormal(math.log(median), sigma)))
            if low <= value <= high:
                return value

    pairs = []
    for _ in range(count):
        prompt = draw(dist["prompt_median"], dist["prompt_sigma"], 2,
                      dist["max_prompt_length"])
        room = dist["max_length"] - prompt
        pairs.append((prompt, *(draw(dist["completion_median"], dist["completion_sigma"], 2,
                                     room) for _ in range(2))))
    return pairs


def write_pairs(path: pathlib.Path, lengths, words: int, seed: int) -> None:
    """Rows {prompt, chosen, rejected} of random words w0..w{words-1}: prompt = length - 1
    words (the tokenizer adds BOS), each completion = length - 1 words; both trainers append
    EOS. (The completion text does not end with `</s>` itself: trl then appends nothing, but
    mixpo.data.formats.render_example appends EOS to plain-string completions unconditionally,
    so that text would get two EOS in mixpo and one in trl.)"""
    import random

    rng = random.Random(seed)

    def text(count):
        return " ".join(f"w{rng.randrange(words)}" for _ in range(count))
    with path.open("w") as handle:
        for prompt, chosen, rejected in lengths:
            handle.write(json.dumps({"prompt": text(prompt - 1),
                                     "chosen": " " + text(chosen - 1),
                                     "rejected": " " + text(rejected - 1)}) + "\n")


def batch_accounting(lengths, steps: int, global_batch: int, micro: int) -> dict:
    """Per optimizer step: real tokens (prompt + completion of chosen and rejected, no padding)
    and the tokens of the padded batches (2m rows x the longest sequence of each micro-batch,
    what PreferenceCollator and trl's collator build)."""
    real, padded = [], []
    for step in range(steps):
        pairs = lengths[step * global_batch:(step + 1) * global_batch]
        real.append(sum(2 * p + c + r for p, c, r in pairs))
        padded.append(sum(2 * len(chunk) * max(p + max(c, r) for p, c, r in chunk)
                          for chunk in (pairs[i:i + micro] for i in range(0, len(pairs), micro))))
    return {"real_tokens_per_step": real, "padded_tokens_per_step": padded}


# ----------------------------------------------------------------------------------------------
# Inside a worker process
# ----------------------------------------------------------------------------------------------
class StepProbe(PeakMemory):
    """A global optimizer step post-hook: the time and the memory high-water mark at the end of
    every optimizer step, whichever trainer runs it. Memory counts from `reset()`."""

    def __init__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        super().__init__()
        self.stamps, self.peaks = [], []
        register_optimizer_step_post_hook(self._hook)

    def reset(self) -> None:
        import gc

        gc.collect()
        super().reset()

    def _hook(self, optimizer, args, kwargs) -> None:
        sync()
        self.stamps.append(time.perf_counter())
        self.peaks.append(self.peak())


def _count_collated(records: list) -> None:
    """Record (real tokens, batch tokens) of every batch mixpo's collators build. A shared
    row counts its prompts twice, as the unshared pairs it stands for: every configuration
    gets the same numerator, so tokens/s compares the same data."""
    from mixpo.data import collate

    for cls in (collate.PreferenceCollator, collate.PackedPreferenceCollator,
                collate.SharedPrefixCollator):
        def counted(self, examples, _original=cls.__call__):
            batch = _original(self, examples)
            real = int(batch["attention_mask"].sum())
            if "segment_lengths" in batch:
                real += int(batch["segment_lengths"][0::3].sum())
            records.append((real, max(real, int(batch["input_ids"].numel()))))
            return batch
        cls.__call__ = counted


def worker(spec: dict) -> dict:
    import torch

    import gpu_stage_training as shared   # beside this script (sys.path[0])

    cuda = torch.cuda.is_available()
    trl = spec["config"] in TRL_LOOP
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    # Library code is not training memory: every worker imports its trainer's stack, and the
    # model classes both trainers load lazily (~200 MB of RSS for transformers' Llama code),
    # before the memory baseline.
    import datasets  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401
    if trl:
        from trl import DPOConfig, DPOTrainer  # noqa: F401
        if spec["config"] != "trl":
            import mixpo.integrations.trl  # noqa: F401
    else:
        import tqdm.auto  # noqa: F401
        import yaml  # noqa: F401

        import mixpo.data.collate  # noqa: F401
        import mixpo.data.difficulty  # noqa: F401
        import mixpo.data.io  # noqa: F401
        import mixpo.data.sampler  # noqa: F401
        import mixpo.data.tokenize  # noqa: F401
        import mixpo.train.trainer  # noqa: F401
        from mixpo.hf.loading import attention_implementation
    probe = StepProbe()
    probe.reset()
    ready = pathlib.Path(spec["work"]) / READY
    waited = time.perf_counter()
    while not ready.exists():          # the driver builds the model meanwhile
        if time.perf_counter() - waited > 1800:
            raise TimeoutError(f"{ready} never appeared (the model was not built)")
        time.sleep(0.1)
    started = time.perf_counter()
    if trl:
        run = shared._worker_trl(spec["trl"])
        batches = list(zip(run["tokens_per_step"], run["padded_tokens_per_step"]))
        rows = [row for row in run["log_history"] if "loss" in row and "step" in row]
        attention = "sdpa"
        extra = {}
    else:
        records = []
        _count_collated(records)
        run = shared._worker_mixpo({"overrides": spec["overrides"]})
        if run["dropped_config_keys"]:   # the GPU check's builder drops unknown keys; not here
            raise ValueError(f"mixpo's config no longer knows {run['dropped_config_keys']}")
        micro_batches = spec["steps"] * spec["accumulation"]
        batches = records[-micro_batches:]     # the reference pass collates first
        rows = run["metrics"]
        attention = attention_implementation(spec["overrides"]["attn_implementation"],
                                             torch.device("cuda" if cuda else "cpu"))
        extra = {"trainer_tokens_per_s": [row["tokens_per_second"] for row in rows]}
    wall = time.perf_counter() - started
    steps = spec["steps"]
    if len(probe.stamps) != steps:
        raise RuntimeError(f"{len(probe.stamps)} optimizer steps seen, expected {steps}")
    accumulation = spec["accumulation"]
    real = [sum(b[0] for b in batches[i * accumulation:(i + 1) * accumulation])
            for i in range(steps)]
    padded = [sum(b[1] for b in batches[i * accumulation:(i + 1) * accumulation])
              for i in range(steps)]
    return {"step_end_s": [stamp - probe.stamps[0] for stamp in probe.stamps],
            "peak_mib_after_step": [peak / MIB for peak in probe.peaks],
            "peak_mib": probe.peaks[-1] / MIB, "baseline_mib": probe.baseline / MIB,
            "observed_real_tokens_per_step": real, "observed_batch_tokens_per_step": padded,
            "loss": [row["loss"] for row in rows],
            "logps_chosen": [row.get("logps/chosen") for row in rows],
            "logps_rejected": [row.get("logps/rejected") for row in rows],
            "attn_implementation": attention, "worker_wall_s": wall,
            "threads": torch.get_num_threads(), **extra}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def make_specs(args, work: pathlib.Path, dist: dict) -> dict:
    accumulation = args.global_batch // args.micro_batch
    common = {"steps": args.steps, "accumulation": accumulation, "threads": args.threads,
              "work": str(work)}
    specs = {}
    for config in CONFIGS:
        out = work / config
        if config in TRL_LOOP:
            specs[config] = {**common, "config": config, "trl": {
                "trainer": "trl" if config == "trl" else "mixpo",
                "padding_free": config == "mixpo_in_trl_packed",
                "model": str(work / "model"), "train_file": str(work / "train.jsonl"),
                "output_dir": str(out), "pairs": args.micro_batch, "steps": args.steps,
                "accumulation": accumulation, "max_length": dist["max_length"],
                "ready": str(work / READY), "beta": args.beta,
                "learning_rate": args.learning_rate, "lr_scheduler_type": "constant",
                "sampling": "sequential", "seed": args.seed}}
            continue
        packed = config in ("mixpo_packed", "mixpo_shared")
        specs[config] = {**common, "config": config, "overrides": {
            "model_name_or_path": str(work / "model"), "train_file": str(work / "train.jsonl"),
            "output_dir": str(out), "max_length": dist["max_length"],
            "max_prompt_length": dist["max_prompt_length"], "loss_type": "sigmoid",
            "beta": args.beta, "learning_rate": args.learning_rate,
            "lr_scheduler_type": "constant", "warmup_ratio": 0.0, "optim": "adamw",
            "max_grad_norm": 1.0, "global_batch_size": args.global_batch,
            "per_device_train_batch_size": args.micro_batch, "max_steps": args.steps,
            "reference": "precomputed", "reference_batch_size": args.micro_batch,
            "padding_free": packed, "prefix_sharing": config == "mixpo_shared",
            # flash-attn cannot mask a shared row: the shared run is sdpa everywhere.
            "attn_implementation": "auto" if config == "mixpo_packed" else "sdpa",
            "gradient_checkpointing": False, "logging_steps": 1, "save_steps": 0,
            "progress_bar": False, "seed": args.seed}}
    return specs


def run_workers(specs: dict, work: pathlib.Path, jobs: int, timeout: float,
                accounting: dict, rounds: int, prepare) -> dict:
    """Every configuration `rounds` times (the order reversed every other round), `jobs` at
    a time; per configuration the round with the highest tokens/s (the one least disturbed
    by whatever else the machine ran), every round's tokens/s and peak kept beside it.
    `prepare()` (model and data) runs while the first workers import their libraries; they
    wait for its READY file before training."""
    tried = {name: [] for name in specs}
    for round_index in range(rounds):
        order = list(specs) if round_index % 2 == 0 else list(reversed(specs))
        while order:
            batch, order = order[:jobs], order[jobs:]
            started = [start_worker(SCRIPT, f"{name}.{round_index}",
                                    _in_round(specs[name], round_index), work,
                                    work / f"{name}.{round_index}.log", child_env())
                       for name in batch]
            if prepare is not None:
                prepare()
                (work / READY).touch()
                prepare = None
            for name, run in zip(batch, started):
                row = measure(finish_worker(run, timeout - (time.perf_counter()
                                                            - run["started"])), accounting)
                tried[name].append(row)
                status = row.get("error") or (
                    f"{row['tokens_per_s']:8.1f} tok/s, peak {row['peak_mib']:7.1f} MiB, "
                    "loss " + " ".join(f"{x:.5f}" for x in row["loss"]))
                print(f"{name:13s} round {round_index + 1}: {status}", flush=True)
    results = {}
    for name, rows in tried.items():
        good = [row for row in rows if "error" not in row]
        if not good:
            results[name] = rows[-1]
            continue
        best = max(good, key=lambda row: row["tokens_per_s"])
        results[name] = {**best, "rounds": len(rows), "errors": len(rows) - len(good),
                         "rounds_tokens_per_s": [row["tokens_per_s"] for row in good],
                         "rounds_peak_mib": [row["peak_mib"] for row in good]}
    return results


def _in_round(spec: dict, round_index: int) -> dict:
    """The spec with an output folder of its own per round (mixpo's trainer would otherwise
    find the finished run of round 1 there and do nothing; its reference cache too)."""
    spec = json.loads(json.dumps(spec))
    for part in ("overrides", "trl"):
        if part in spec:
            spec[part]["output_dir"] += f".{round_index}"
    return spec


def measure(row: dict, accounting: dict) -> dict:
    """One worker's tokens/s (real tokens of steps 2..N over their wall time), the token
    check against the data, and its pad fraction."""
    if "error" in row:
        return row
    real = accounting["real_tokens_per_step"]
    row["timed_s"] = row["step_end_s"][-1] - row["step_end_s"][0]
    row["timed_tokens"] = sum(real[1:])
    row["tokens_per_s"] = row["timed_tokens"] / row["timed_s"]
    row["step_seconds"] = [b - a for a, b in zip(row["step_end_s"], row["step_end_s"][1:])]
    row["tokens_match_data"] = row["observed_real_tokens_per_step"] == real
    row["pad_fraction"] = 1 - (sum(row["observed_real_tokens_per_step"])
                               / sum(row["observed_batch_tokens_per_step"]))
    return row


def main(argv=None) -> int:
    import torch

    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4 if on_gpu else 2)
    parser.add_argument("--hidden", type=int, default=512 if on_gpu else 256)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--heads", type=int, default=None, help="default H / 64 (at least 4)")
    parser.add_argument("--length-scale", type=float, default=1.0 if on_gpu else 0.25)
    parser.add_argument("--prompt-median", type=float, default=100.0)
    parser.add_argument("--prompt-sigma", type=float, default=0.9)
    parser.add_argument("--completion-median", type=float, default=250.0)
    parser.add_argument("--completion-sigma", type=float, default=0.6)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--max-prompt-length", type=int, default=512)
    parser.add_argument("--long-prompt", action="store_true",
                        help="prompts ~70 %% of each sequence (retrieval / summarisation "
                        "data: prompt median 700, completion median 300, sigmas 0.3, caps "
                        "1024 / 1536), for prefix sharing")
    parser.add_argument("--global-batch", type=int, default=16 if on_gpu else 4,
                        help="pairs per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=8 if on_gpu else 4,
                        help="pairs per forward pass")
    parser.add_argument("--steps", type=int, default=12 if on_gpu else 4,
                        help="optimizer steps; the first is the warm-up")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--words", type=int, default=5000, help="tokenizer words (<= V - 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: torch's, = the cores)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every configuration this many times, keep the fastest")
    parser.add_argument("--jobs", type=int, default=1,
                        help="workers at once (tests; > 1 makes the timings contend)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per worker")
    parser.add_argument("--work-dir", default=None, help="keep models and logs here")
    parser.add_argument("--out", default=None, help="JSON path (default results/train_<dev>)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(pathlib.Path(args.worker).read_text())
        write_json(pathlib.Path(spec["result"]), worker(spec))
        return 0
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first is the warm-up)")
    if args.global_batch % args.micro_batch:
        parser.error("--global-batch must be a multiple of --micro-batch")
    if args.words > args.vocab - 4:
        args.words = args.vocab - 4
    if args.long_prompt:
        args.prompt_median, args.prompt_sigma = 700.0, 0.3
        args.completion_median, args.completion_sigma = 300.0, 0.3
        args.max_prompt_length, args.max_length = 1024, 1536

    import gpu_stage_training as shared   # beside this script (sys.path[0])

    device = "cuda" if on_gpu else "cpu"
    heads = args.heads or max(4, args.hidden // 64)
    model_shape = dict(vocab_size=args.vocab, hidden_size=args.hidden,
                       intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                       num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                       rope_theta=500000.0)
    dist = length_distribution(args)
    pairs = args.steps * args.global_batch
    lengths = draw_lengths(pairs, dist, args.seed)
    accounting = batch_accounting(lengths, args.steps, args.global_batch, args.micro_batch)
    work = pathlib.Path(args.work_dir) if args.work_dir else \
        pathlib.Path(tempfile.mkdtemp(prefix="bench_train_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    built = {}

    def prepare():
        built.update(shared._build_model_dir(work / "model", {
            "model": model_shape, "words": args.words,
            "prompt_words": dist["max_prompt_length"], "completion_words": dist["max_length"]}))
        write_pairs(work / "train.jsonl", lengths, args.words, args.seed)
        print(f"model {built['parameters'] / 1e6:.1f} M parameters, {pairs} pairs, "
              f"{sum(accounting['real_tokens_per_step'])} real tokens; running "
              f"{', '.join(specs)} on {device}", flush=True)

    try:
        (work / READY).unlink(missing_ok=True)
        specs = {name: spec for name, spec in make_specs(args, work, dist).items()
                 if name in args.configs}
        results = run_workers(specs, work, args.jobs, args.timeout, accounting, args.rounds,
                              prepare)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarise(results, accounting)
    element = 2 if on_gpu else 4
    params = built["parameters"]
    summary["flop_estimate"] = flop_estimate({**model_shape, "parameters": params}, accounting,
                                             lengths, on_gpu)
    report = {
        "benchmark": "train", "baseline": BASELINE,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_name(), "versions": versions(PACKAGES),
        "model": {**model_shape, "parameters": params, "tie_word_embeddings": True,
                  "dtype": "bfloat16" if on_gpu else "float32",
                  "model_state_mib": params * 4 * element / MIB},
        "lengths": dist,
        "batch": {"global_batch_pairs": args.global_batch, "micro_batch_pairs": args.micro_batch,
                  "steps": args.steps, "timed_steps": args.steps - 1, "pairs": pairs,
                  "real_tokens_per_step": accounting["real_tokens_per_step"],
                  "padded_tokens_per_step": accounting["padded_tokens_per_step"],
                  "length_stats": _length_stats(lengths)},
        "training": {"loss_type": "sigmoid", "beta": args.beta,
                     "learning_rate": args.learning_rate, "lr_scheduler_type": "constant",
                     "optimizer": "torch AdamW", "max_grad_norm": 1.0,
                     "reference": "precomputed", "gradient_checkpointing": False,
                     "seed": args.seed, "jobs": args.jobs, "threads": args.threads,
                     "rounds": args.rounds},
        "measurement": {
            "tokens_per_s": "real tokens (prompt + completion of chosen and rejected, no "
                            "padding) of steps 2..N / (end of step N - end of step 1); step ends "
                            "stamped by a global optimizer step post-hook",
            "peak_memory": "torch.cuda.max_memory_allocated at the end of step N, reset after "
                           "the imports" if on_gpu else
                           "VmHWM at the end of step N - VmRSS after the worker's imports "
                           "(VmHWM reset via /proc/self/clear_refs)"},
        "configs": results, "summary": summary,
        "total_wall_s": time.perf_counter() - started}
    report["notes"] = notes(report)
    _print_summary(report)
    out = pathlib.Path(args.out) if args.out else RESULTS / f"train_{device}.json"
    write_report(report, out, plot)
    return 0 if all("error" not in row for row in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
