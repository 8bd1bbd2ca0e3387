"""The report of benchmarks/bench_train.py: what to expect from the FLOPs, the ratios against
trl, the issue's goal, the notes that explain the numbers, the printed summary and the plot.
Pure functions of the measured rows (no torch, no subprocesses)."""
from __future__ import annotations

import pathlib
import statistics

CONFIGS = ("mixpo_padded", "mixpo_packed", "mixpo_shared", "trl", "mixpo_in_trl",
           "mixpo_in_trl_packed")
TRL_LOOP = ("trl", "mixpo_in_trl", "mixpo_in_trl_packed")     # run through trl's trainer
BASELINE = "trl"
GOAL = {"speedup": 1.5, "memory_ratio": 0.5}     # mixpo_packed vs trl (issue 14)
SHARING_GOAL = 1.3       # mixpo_shared vs mixpo_packed tokens/s, prompts ~70 % (issue 23)


def flop_estimate(model: dict, accounting: dict, lengths, cuda: bool) -> dict:
    """Matmul FLOPs of the timed steps, 6 x parameters x tokens (forward + backward; the
    attention's quadratic term left out), split into the body (every position it runs: padded
    batches for mixpo_padded and trl, real tokens packed, each prompt once when shared) and
    the LM head (the positions it scores: mixpo the completion tokens; trl the same on CUDA,
    but every position of its padded batch elsewhere, this CPU included). Explains where the
    measured ratios come from."""
    head = model["vocab_size"] * model["hidden_size"]
    body = model["parameters"] - head                   # tied embeddings: the head's weight
    steps = len(accounting["real_tokens_per_step"])
    per_step = len(lengths) // steps
    completion = [sum(c + r for _, c, r in lengths[i * per_step:(i + 1) * per_step])
                  for i in range(steps)]
    real, padded = accounting["real_tokens_per_step"], accounting["padded_tokens_per_step"]
    rows = [2 * per_step] * steps                       # sequences per step
    shared = [sum(p + c + r for p, c, r in lengths[i * per_step:(i + 1) * per_step])
              for i in range(steps)]
    positions = {"mixpo_padded": (padded, completion), "mixpo_packed": (real, completion),
                 "mixpo_shared": (shared, completion),
                 "trl": (padded, completion if cuda else
                         [p - r for p, r in zip(padded, rows)]),
                 "mixpo_in_trl": (padded, completion),
                 "mixpo_in_trl_packed": (real, completion)}
    estimate = {}
    for name, (body_tokens, head_tokens) in positions.items():
        body_flops = 6 * body * sum(body_tokens[1:])
        head_flops = 6 * head * sum(head_tokens[1:])
        estimate[name] = {"body_tflop": body_flops / 1e12, "head_tflop": head_flops / 1e12,
                          "head_share": head_flops / (body_flops + head_flops)}
    for name, row in estimate.items():
        row["flops_vs_trl"] = ((row["body_tflop"] + row["head_tflop"])
                               / (estimate["trl"]["body_tflop"] + estimate["trl"]["head_tflop"]))
    return estimate


def summarise(results: dict, accounting: dict) -> dict:
    """Ratios vs trl, pad fraction, loss agreement, the goal."""
    real = accounting["real_tokens_per_step"]
    summary = {}
    base = results.get(BASELINE, {})
    for name, row in results.items():
        if name == BASELINE or "error" in row or "error" in base or not base:
            continue
        row["vs_trl"] = {"speedup": row["tokens_per_s"] / base["tokens_per_s"],
                         "memory_ratio": row["peak_mib"] / base["peak_mib"]}
    ok = [name for name in results if "error" not in results[name]]

    def max_diff(a, b, key):
        pairs = [(x, y) for x, y in zip(results[a][key], results[b][key])
                 if x is not None and y is not None]
        return max((abs(x - y) for x, y in pairs), default=None)
    for a, b in (("mixpo_padded", "mixpo_packed"), ("mixpo_padded", "trl"),
                 ("mixpo_in_trl", "trl"), ("mixpo_in_trl", "mixpo_in_trl_packed")):
        if a in ok and b in ok:
            summary[f"{a}_vs_{b}"] = {
                "first_step_loss": [results[a]["loss"][0], results[b]["loss"][0]],
                "max_abs_loss_diff": max_diff(a, b, "loss"),
                "max_abs_logps_chosen_diff": max_diff(a, b, "logps_chosen"),
                "max_abs_logps_rejected_diff": max_diff(a, b, "logps_rejected")}
    if "mixpo_packed" in ok and BASELINE in ok:
        ratios = results["mixpo_packed"]["vs_trl"]
        summary["goal"] = {**{f"target_{k}": v for k, v in GOAL.items()},
                           "speedup": ratios["speedup"], "memory_ratio": ratios["memory_ratio"],
                           "speedup_met": ratios["speedup"] >= GOAL["speedup"],
                           "memory_met": ratios["memory_ratio"] <= GOAL["memory_ratio"]}
    if "mixpo_shared" in ok and "mixpo_packed" in ok:
        ratio = results["mixpo_shared"]["tokens_per_s"] / results["mixpo_packed"]["tokens_per_s"]
        summary["sharing"] = {"speedup_vs_packed": ratio, "target": SHARING_GOAL,
                              "met": ratio >= SHARING_GOAL,
                              "max_abs_loss_diff": max_diff("mixpo_shared", "mixpo_packed",
                                                            "loss")}
    if "mixpo_padded" in ok:
        summary["pad_fraction_padded"] = results["mixpo_padded"]["pad_fraction"]
    summary["data_pad_fraction"] = 1 - sum(real) / sum(accounting["padded_tokens_per_step"])
    return summary


def notes(report: dict) -> list[str]:
    """What to keep in mind when reading the numbers, from the numbers themselves."""
    summary, found = report["summary"], []
    flops = summary.get("flop_estimate", {})
    if report["device"].startswith("CPU") and flops:
        found.append(
            "CPU: trl's fused head scores every position of its padded batch off CUDA/XPU "
            f"(head {flops['trl']['head_tflop']:.3g} TFLOP vs mixpo's "
            f"{flops['mixpo_packed']['head_tflop']:.3g} over the completion tokens) and always "
            "computes entropy / mean logits / top-1, so this ratio overstates what a GPU, "
            "where trl compacts the completion rows, would show")
    for key, label in (("mixpo_padded_vs_mixpo_packed", "mixpo padded vs packed"),
                       ("mixpo_padded_vs_trl", "mixpo padded vs trl"),
                       ("mixpo_in_trl_vs_trl", "MixpoDPOTrainer vs trl's DPOTrainer"),
                       ("mixpo_in_trl_vs_mixpo_in_trl_packed",
                        "MixpoDPOTrainer padded vs padding_free")):
        if key not in summary:
            continue
        diff = summary[key]["max_abs_loss_diff"]
        verdict = "agree to fp32 rounding (the same math summed in another order)" \
            if diff is not None and diff < 1e-4 else "DIFFER beyond rounding: investigate"
        first = summary[key]["first_step_loss"]
        found.append(f"{label}: step-1 losses {first[0]:.6f} / {first[1]:.6f} (log 2: the "
                     f"policy is the reference), largest loss difference over the steps "
                     f"{diff:.2e}: {verdict}")
    padded, packed = (report["configs"].get(name, {}) for name in ("mixpo_padded",
                                                                    "mixpo_packed"))
    if "tokens_per_s" in padded and "tokens_per_s" in packed and flops:
        work = {name: flops[name]["body_tflop"] + flops[name]["head_tflop"]
                for name in ("mixpo_padded", "mixpo_packed")}
        body_share = flops["mixpo_padded"]["body_tflop"] / work["mixpo_padded"]
        measured = packed["tokens_per_s"] / padded["tokens_per_s"]
        expected = work["mixpo_padded"] / work["mixpo_packed"]
        found.append(
            f"packed vs padded: {measured:.2f}x measured, {expected:.2f}x expected from the "
            f"matmul FLOPs: the padding ({padded['pad_fraction']:.0%} of the padded batches) "
            f"costs only body FLOPs, {body_share:.0%} of mixpo's work at this shape"
            + ("; the gap to the expectation is more than the FLOPs explain: timing noise "
               "(other jobs on the machine; --rounds repeats the runs) or costs outside the "
               "matmuls" if abs(measured / expected - 1) > 0.25 else ""))
    return found


def _length_stats(lengths) -> dict:
    prompts = [p for p, _, _ in lengths]
    completions = [c for _, c, _ in lengths] + [r for _, _, r in lengths]
    return {"prompt_mean": statistics.mean(prompts), "prompt_median": statistics.median(prompts),
            "prompt_max": max(prompts), "completion_mean": statistics.mean(completions),
            "completion_median": statistics.median(completions),
            "completion_max": max(completions)}


def _print_summary(report: dict) -> None:
    for name, row in report["configs"].items():
        if "error" in row:
            print(f"{name:19s} error: {row['error']}")
            continue
        ratios = row.get("vs_trl")
        flops = report["summary"]["flop_estimate"][name]
        versus = (f" | {ratios['speedup']:.2f}x trl tokens/s, {ratios['memory_ratio']:.2f}x "
                  "its peak") if ratios else ""
        versus += f" | FLOPs {flops['flops_vs_trl']:.2f}x trl's, head {flops['head_share']:.0%}"
        print(f"{name:19s} {row['tokens_per_s']:9.1f} tok/s  peak {row['peak_mib']:8.1f} MiB  "
              f"pad {row['pad_fraction']:.3f}  tokens ok {row['tokens_match_data']}{versus}")
    for note in report["notes"]:
        print(f"note: {note}")
    sharing = report["summary"].get("sharing")
    if sharing:
        print(f"prefix sharing vs unshared packed: {sharing['speedup_vs_packed']:.2f}x tokens/s "
              f"(>= {sharing['target']}: {sharing['met']}), largest loss difference "
              f"{sharing['max_abs_loss_diff']:.2e}")
    goal = report["summary"].get("goal")
    if goal:
        print(f"goal (packed vs trl): speedup {goal['speedup']:.2f} (>= {goal['target_speedup']}: "
              f"{goal['speedup_met']}), memory {goal['memory_ratio']:.2f} "
              f"(<= {goal['target_memory_ratio']}: {goal['memory_met']})")


def plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {name: row for name, row in report["configs"].items() if "error" not in row}
    names = list(rows)
    colors = {"mixpo_padded": "tab:blue", "mixpo_packed": "tab:green",
              "mixpo_shared": "tab:cyan", "trl": "tab:gray",
              "mixpo_in_trl": "tab:purple", "mixpo_in_trl_packed": "tab:olive"}
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("tokens_per_s", "real tokens / s (steps 2..N)", "speedup"),
              ("peak_mib", "peak memory, MiB", "memory_ratio"))
    for axis, (key, label, ratio) in zip(axes, panels):
        bars = axis.bar(names, [rows[n][key] for n in names],
                        color=[colors.get(n, "tab:orange") for n in names])
        for bar, name in zip(bars, names):
            text = f"{rows[name]['vs_trl'][ratio]:.2f}x trl" if "vs_trl" in rows[name] else ""
            axis.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8)
        axis.set_ylabel(label)
        axis.tick_params(axis="x", labelrotation=25, labelsize=8)
    model_state = report["model"]["model_state_mib"]
    axes[1].axhline(model_state, color="k", linestyle=":", linewidth=1)
    axes[1].annotate("weights + grads + AdamW states", (len(names) - 0.5, model_state),
                     fontsize=7, va="bottom", ha="right")
    for name in names:
        axes[2].plot(range(1, len(rows[name]["loss"]) + 1), rows[name]["loss"], marker="o",
                     label=name, color=colors.get(name, "tab:orange"))
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("loss")
    axes[2].legend(fontsize=8)
    model, batch = report["model"], report["batch"]
    pad = report["summary"].get("pad_fraction_padded")
    figure.suptitle(
        f"training on {report['device']}: Llama {model['num_hidden_layers']}L H"
        f"{model['hidden_size']} V{model['vocab_size']} {model['dtype']}, global batch "
        f"{batch['global_batch_pairs']} pairs (micro {batch['micro_batch_pairs']}), "
        f"{batch['steps']} steps, length scale {report['lengths']['length_scale']}"
        + (f", pad fraction (padded) {pad:.2f}" if pad is not None else ""), fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
