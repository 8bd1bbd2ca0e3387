"""Stage 2 of benchmarks/gpu_check.py (correctness): every kernel against its torch twin at
real shapes, kernel outputs NaN-poisoned first. stage_correctness builds the plan of cases and
runs each through _run_case; the case functions (_linear_case, _logits_case, _pair_case,
_margin_case, _api_case) compute one run's errors per output. The stage function takes a
`gpu_check_common.StageContext`, fills `ctx.details` (saving after every case), and returns
(verdict, one-line headline)."""
from __future__ import annotations

import contextlib
import math
import time
from functools import partial

import torch

from gpu_check_common import (QUICK_RUNS, RUNS, THRESHOLDS, _dtype_name, _free,
                              poisoned_outputs, rel_error)
from harness import BETA, IGNORE_INDEX, device, generator


def _correctness_shapes(quick: bool) -> dict:
    if quick:
        return dict(vocabs=(1000, 2053, 4000), hidden=64, linear=(6, 16), logits=(6, 16),
                    pairs=300, solve_sets=(8, 256, 1000), api=(2, 24, 2053))
    return dict(vocabs=(128256, 151936, 256000), hidden=4096, linear=(8, 384), logits=(6, 64),
                pairs=1000, solve_sets=(8, 256, 2048, 8192), api=(2, 256, 128256))


# One logit transform per vocabulary, so every path runs: none, Cohere-style scale, Gemma-2 cap.
TRANSFORMS = ({}, {"logit_scale": 0.125}, {"softcap": 30.0})


def _ragged_labels(num_seqs: int, seq_len: int, vocab: int, seed: int, all_prompt=(1,)):
    """[S, T] labels: a random prompt (1 .. T/2) and padding (0 .. T/4) per row, whole rows of
    ignore_index (sequences that are all prompt), the last vocab id once (a partial tile)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (num_seqs, seq_len), generator=gen)
    for row in range(num_seqs):
        prompt = int(torch.randint(1, max(2, seq_len // 2), (1,), generator=gen))
        pad = int(torch.randint(0, max(1, seq_len // 4), (1,), generator=gen))
        labels[row, :prompt] = IGNORE_INDEX
        if pad:
            labels[row, seq_len - pad:] = IGNORE_INDEX
    labels[list(all_prompt)] = IGNORE_INDEX
    labels[0, seq_len // 2] = vocab - 1
    return labels.to(device())


def _compare(outputs: dict, kernel: dict, twin: dict, prefix: str = "") -> None:
    for name, expected in twin.items():
        if expected is None:
            continue
        if name == "top1":      # 0/1 flags: count disagreements (a near-tie may flip one)
            flips = int((kernel[name] != expected).sum())
            outputs[prefix + "top1_flips"] = (0.0 if flips <= 1 else math.inf, 0)
        else:
            outputs[prefix + name] = rel_error(kernel[name], expected)


def _linear_case(vocab, dtype, transform, bias, seed, shapes):
    """Logit-free kernels vs linear_logps_torch on compacted rows of a ragged batch."""
    from mixpo.kernels import linear_logps as kernel, linear_logps_torch as twin

    num_seqs, seq_len = shapes["linear"]
    hidden_size, gen = shapes["hidden"], generator(seed)
    hidden = torch.randn(num_seqs * seq_len, hidden_size, generator=gen, device=device())
    weight = 3 * torch.randn(vocab, hidden_size, generator=gen, device=device()) / hidden_size**0.5
    bias_t = torch.randn(vocab, generator=gen, device=device()).to(dtype) if bias else None
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    flat = _ragged_labels(num_seqs, seq_len, vocab, seed, all_prompt=(1, num_seqs - 2)).reshape(-1)
    rows = torch.nonzero(flat != IGNORE_INDEX).squeeze(1)
    labels = flat[rows]
    grad_token = torch.randn(rows.shape[0], generator=gen, device=device())
    grad_token[: rows.shape[0] // 8] = 0.0       # tokens without gradient (MixDPO's rejected)
    out = {}
    for stats in (False, True):
        with poisoned_outputs():
            k_logps, k_lse, k_aux = kernel.linear_token_logps_forward(
                hidden, weight, bias_t, labels, rows, stats=stats, **transform)
        t_logps, t_lse, t_aux = twin.linear_token_logps_forward(
            hidden, weight, bias_t, labels, rows, stats=stats, **transform)
        prefix = "stats:" if stats else ""
        _compare(out, {"token_logps": k_logps, "lse": k_lse, **k_aux},
                 {"token_logps": t_logps, "lse": t_lse, **t_aux}, prefix)
    with poisoned_outputs():
        k_grads = kernel.linear_token_logps_backward(hidden, weight, bias_t, labels, rows, k_lse,
                                                     grad_token, k_aux["label_logit"], **transform)
    t_grads = twin.linear_token_logps_backward(hidden, weight, bias_t, labels, rows, t_lse,
                                               grad_token, t_aux["label_logit"], **transform)
    _compare(out, dict(zip(("dhidden", "dweight", "dbias"), k_grads)),
             dict(zip(("dhidden", "dweight", "dbias"), t_grads)))
    # The default backward has no atomics: a second run is bit-identical. The atomic
    # alternative matches the twin too.
    again = kernel.linear_token_logps_backward(hidden, weight, bias_t, labels, rows, k_lse,
                                               grad_token, k_aux["label_logit"], **transform)
    same = all(torch.equal(a, b) for a, b in zip(k_grads, again) if a is not None)
    out["gemm_bitwise_reproducible"] = (0.0 if same else math.inf, 0)
    with poisoned_outputs():
        a_grads = kernel.linear_token_logps_backward(hidden, weight, bias_t, labels, rows, k_lse,
                                                     grad_token, method="atomic", **transform)
    _compare(out, dict(zip(("dhidden", "dweight", "dbias"), a_grads)),
             dict(zip(("dhidden", "dweight", "dbias"), t_grads)), "atomic:")
    unlisted = torch.ones(hidden.shape[0], dtype=torch.bool, device=device())
    unlisted[rows] = False                        # prompt, padding and all-prompt rows
    nonzero = int((k_grads[0][unlisted] != 0).sum())
    out["dhidden_unlisted_rows_zero"] = (0.0 if nonzero == 0 else math.inf, 0)
    return out


def _logits_case(vocab, dtype, transform, seed, shapes):
    """Materialised-logits kernels vs logits_logps_torch, backward out of place and in place."""
    from mixpo.kernels import logits_logps as kernel, logits_logps_torch as twin

    num_seqs, seq_len = shapes["logits"]
    gen = generator(seed)
    logits = (3 * torch.randn(num_seqs, seq_len, vocab, generator=gen, device=device())).to(dtype)
    labels = _ragged_labels(num_seqs, seq_len, vocab, seed)
    coef = torch.randn(num_seqs, seq_len, generator=gen, device=device()) * (labels != IGNORE_INDEX)
    out = {}
    for stats in (False, True):
        with poisoned_outputs():
            k_logps, k_lse, k_stats = kernel.token_logps_forward(logits, labels, IGNORE_INDEX,
                                                                 stats=stats, **transform)
        t_logps, t_lse, t_stats = twin.token_logps_forward(logits, labels, IGNORE_INDEX,
                                                           stats=stats, **transform)
        prefix = "stats:" if stats else ""
        _compare(out, {"token_logps": k_logps, "lse": k_lse, **(k_stats or {})},
                 {"token_logps": t_logps, "lse": t_lse, **(t_stats or {})}, prefix)
    expected = twin.token_logps_backward(logits, labels, t_lse, coef, IGNORE_INDEX, **transform)
    with poisoned_outputs():
        out["dlogits"] = rel_error(kernel.token_logps_backward(
            logits, labels, k_lse, coef, IGNORE_INDEX, **transform), expected)
    buffer = logits.clone()
    result = kernel.token_logps_backward(buffer, labels, k_lse, coef, IGNORE_INDEX, inplace=True,
                                         **transform)
    out["dlogits_inplace"] = rel_error(result, expected)
    out["inplace_same_buffer"] = (0.0 if result.data_ptr() == buffer.data_ptr() else math.inf, 0)
    return out


def _pair_configs():
    """(label, LossConfig keywords) for every loss type with a kernel code, plus lists,
    f-divergence, R-DPO / DPOP penalties and the per-pair NLL term."""
    from mixpo.loss_spec import LOSS_TYPES

    cases = []
    for name, spec in LOSS_TYPES.items():
        if spec.kernel_code is None:
            continue
        keywords = {"loss_type": name, "beta": 2.0 if name == "simpo" else BETA}
        if spec.label_smoothing:
            keywords["label_smoothing"] = 0.1
        cases.append((name, keywords))
    cases += [("sigmoid+bco_pair list", {"loss_type": ("sigmoid", "bco_pair"),
                                         "loss_weights": (0.7, 0.3), "beta": BETA}),
              ("sigmoid alpha_divergence", {"loss_type": "sigmoid", "beta": BETA,
                                            "f_divergence_type": "alpha_divergence"}),
              ("sigmoid rdpo+dpop", {"loss_type": "sigmoid", "beta": BETA, "rdpo_alpha": 0.01,
                                     "dpop_lambda": 0.5}),
              ("sigmoid pair nll", {"loss_type": "sigmoid", "beta": BETA, "sft_weight": 0.5,
                                    "nll_normalization": "pair"})]
    return cases


def _pair_case(keywords, seed, shapes):
    """The per-pair head (mixpo.kernels.pair_loss: each type's formula written once, its
    gradient by autograd) on the device in fp32 against the same on the CPU in float64:
    values and d loss / d logps."""
    from mixpo import LossConfig
    from mixpo.kernels.pair_loss import pair_terms

    config = LossConfig(**keywords)
    pairs, gen = shapes["pairs"], generator(seed)
    counts = torch.randint(4, 300, (2 * pairs,), generator=gen, device=device()).float()
    logps = -counts * (0.3 + 2.7 * torch.rand(2 * pairs, generator=gen, device=device()))
    nll_logps = logps - torch.rand(2 * pairs, generator=gen, device=device())
    ref = None if config.reference_free else \
        logps + 5 * torch.randn(2 * pairs, generator=gen, device=device())
    hard = torch.rand(pairs, generator=gen, device=device()) < 0.2
    gamma = 0.5 * torch.rand(pairs, generator=gen, device=device())
    weights = 0.5 + torch.rand(pairs, generator=gen, device=device())

    def run(dtype, where):
        def cast(tensor):
            return None if tensor is None else tensor.to(where, dtype)
        inputs = logps.detach().to(where, dtype).requires_grad_()
        loss = pair_terms(inputs, cast(nll_logps), cast(counts), cast(ref), hard.to(where),
                          cast(gamma), cast(weights), config)
        loss.sum().backward()
        return loss.detach(), inputs.grad

    got, want = run(torch.float32, device()), run(torch.float64, "cpu")
    return {"loss": rel_error(got[0], want[0]), "dlogps": rel_error(got[1], want[1])}


def _margin_case(num, seed, shapes):
    from mixpo.kernels import margin_solve as kernel, margin_solve_torch as twin

    gaps = 2 * torch.randn(num, generator=generator(seed), device=device())
    with poisoned_outputs():
        got = kernel.solve_margins(gaps, gamma0=4.0, tau=10.0)
    return {"gamma": rel_error(got, twin.solve_margins(gaps, gamma0=4.0, tau=10.0))}


class _Capture(torch.autograd.Function):
    """Identity that records the gradient reaching it (and passes nothing on)."""

    @staticmethod
    def forward(ctx, tensor, sink):
        ctx.sink = sink
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        ctx.sink.append(grad.detach().clone())
        return None, None


def _api_case(dtype, seed, shapes):
    """The public API on both backends: linear_preference_loss (MixDPO routing, gamma-PO
    margins, label smoothing) and preference_loss with inplace_backward=True (Triton) vs
    backend="torch" (out of place): loss, per-pair losses and gradients."""
    import mixpo

    pairs, seq_len, vocab = shapes["api"]
    hidden_size, gen = shapes["hidden"], generator(seed)
    hidden = torch.randn(2 * pairs, seq_len, hidden_size, generator=gen, device=device())
    weight = 3 * torch.randn(vocab, hidden_size, generator=gen, device=device()) / hidden_size**0.5
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    labels = _ragged_labels(2 * pairs, seq_len, vocab, seed, all_prompt=())
    ref = -100 - 50 * torch.rand(2 * pairs, generator=gen, device=device())
    hard = torch.arange(pairs, device=device()) % 2 == 0
    out, results = {}, {}
    for backend in ("triton", "torch"):
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        margin = mixpo.AdaptiveMargin(gamma0=0.5, tau=10.0, seed=seed, backend=backend)
        with poisoned_outputs() if backend == "triton" else contextlib.nullcontext():
            res = mixpo.linear_preference_loss(h, w, labels, ref_logps=ref, beta=BETA,
                                               label_smoothing=0.1, hard=hard, margin=margin,
                                               backend=backend)
            res.loss.backward()
        results[backend] = (res.loss.detach(), res.per_pair_loss.detach(), h.grad, w.grad)
    for name, got, want in zip(("linear:loss", "linear:per_pair_loss", "linear:dhidden",
                                "linear:dweight"), results["triton"], results["torch"]):
        out[name] = rel_error(got, want)
    logits = (3 * torch.randn(2 * pairs, seq_len, vocab, generator=gen, device=device())).to(dtype)
    for backend in ("triton", "torch"):
        sink = []
        leaf = logits.clone().requires_grad_()
        res = mixpo.preference_loss(_Capture.apply(leaf, sink), labels, ref_logps=ref, beta=BETA,
                                    backend=backend, inplace_backward=backend == "triton")
        res.loss.backward()
        results[backend] = (res.loss.detach(), sink[0])
    out["logits:loss"] = rel_error(results["triton"][0], results["torch"][0])
    out["logits:dlogits_inplace"] = rel_error(results["triton"][1], results["torch"][1])
    return out


def _run_case(ctx, label, kind, threshold, compute, seconds_hint):
    """Run `compute(seed)` RUNS times on fresh inputs; record every output's errors."""
    runs = QUICK_RUNS if ctx.quick else RUNS
    record = {"case": label, "kind": kind, "threshold": threshold, "errors": {},
              "non_finite": 0, "runs": 0}
    ctx.details["cases"].append(record)
    started = time.perf_counter()
    for run in range(runs):
        if not ctx.has_time(seconds_hint):
            record["incomplete"] = "stage time budget"
            break
        for name, (error, bad) in compute(seed=101 * run + len(ctx.details["cases"])).items():
            record["errors"].setdefault(name, []).append(error)
            record["non_finite"] += max(bad, 0)
        record["runs"] += 1
        _free()
    record["seconds"] = round(time.perf_counter() - started, 2)
    worst = max((max(values) for values in record["errors"].values()), default=math.inf)
    record["max_error"] = worst
    record["moving"] = sorted(name for name, values in record["errors"].items()
                              if max(values) > threshold / 10
                              and max(values) > 10 * max(min(values), 1e-30))
    record["pass"] = record["runs"] == runs and worst <= threshold and not record["non_finite"]
    ctx.save()
    return record


def stage_correctness(ctx):
    """Every kernel against its torch twin on the GPU, at real shapes.

    Cases: the logit-free kernels (linear_logps: forward with and without stats, backward) and
    the materialised-logits kernels (logits_logps: forward with and without stats, backward out
    of place and in place) for V = 128256 (plain head), 151936 (logit_scale 0.125; bias on the
    logit-free path) and 256000 (softcap 30), H = 4096, fp32 and bf16, on ragged batches
    (random prompt and padding lengths) with whole all-prompt sequences (the logit-free
    helpers take compacted rows, so those rows are simply absent and their dhidden must stay
    exactly 0); the pair-loss kernel for every loss type of mixpo.loss_spec.LOSS_TYPES with a
    kernel_code plus lists, f-divergence, R-DPO/DPOP and the per-pair NLL term; the margin
    solve for solve sets of 8 to 8192; and the public API (linear_preference_loss with MixDPO
    routing and gamma-PO margins, preference_loss with in-place backward) on both backends.
    Each case runs RUNS = 3 times on fresh random inputs; kernel outputs are poisoned first
    (torch.empty returns NaN-filled tensors, the CUDA allocator's free blocks are NaN bytes), so
    an element never written shows as non-finite. Error per output = max |kernel - twin| /
    max |twin|; a case passes if every run of every output is within THRESHOLDS[dtype] and
    nothing is non-finite. `moving` lists outputs whose error varies > 10x between runs above
    threshold / 10 (what a race looks like).
    """
    shapes = _correctness_shapes(ctx.quick)
    ctx.details.update(thresholds=THRESHOLDS, runs=QUICK_RUNS if ctx.quick else RUNS,
                       shapes=shapes, cases=[])
    large = not ctx.quick
    both = (torch.float32, torch.bfloat16)
    plan = []     # (label, kind, threshold, compute(seed=...), seconds one run needs)
    for index, vocab in enumerate(shapes["vocabs"]):
        transform = TRANSFORMS[index % len(TRANSFORMS)]
        # --quick: one dtype per vocabulary and kernel, alternating, so both still run.
        for kernel in ("linear_logps", "logits_logps"):
            dtypes = both if large else (both[(index + (kernel == "logits_logps")) % 2],)
            for dtype in dtypes:
                name = _dtype_name(dtype)
                tag = f"{kernel} V={vocab} {name} {transform or 'plain'}"
                if kernel == "linear_logps":
                    plan.append((tag + (" +bias" if index == 1 else ""), "linear", THRESHOLDS[name],
                                 partial(_linear_case, vocab, dtype, transform, index == 1,
                                         shapes=shapes), 8 if large else 2))
                else:
                    plan.append((tag, "logits", THRESHOLDS[name], partial(
                        _logits_case, vocab, dtype, transform, shapes=shapes), 6 if large else 2))
    epilogue = THRESHOLDS["epilogue (fp32)"]
    for label, keywords in _pair_configs():
        plan.append((f"pair_loss {label}", "pair_loss", epilogue,
                     partial(_pair_case, keywords, shapes=shapes), 1))
    for num in shapes["solve_sets"]:
        plan.append((f"margin_solve N={num}", "margin_solve", epilogue,
                     partial(_margin_case, num, shapes=shapes), 1))
    for dtype in both if large else (torch.bfloat16,):
        plan.append((f"public API V={shapes['api'][2]} {_dtype_name(dtype)}", "api",
                     THRESHOLDS[_dtype_name(dtype)], partial(_api_case, dtype, shapes=shapes),
                     6 if large else 2))
    for label, kind, threshold, compute, seconds in plan:
        _run_case(ctx, label, kind, threshold, compute, seconds)
    cases = ctx.details["cases"]
    failed = [case["case"] for case in cases if not case["pass"]]
    incomplete = [case["case"] for case in cases if case.get("incomplete")]
    moving = [case["case"] for case in cases if case["moving"]]
    headline = (f"{len(cases) - len(failed)}/{len(cases)} cases within thresholds "
                f"(x{ctx.details['runs']} runs, NaN-poisoned)")
    if failed:
        worst = max(cases, key=lambda case: case["max_error"])
        headline += f"; FAILED: {', '.join(failed[:4])}{' ...' if len(failed) > 4 else ''}; " \
                    f"worst {worst['case']} error {worst['max_error']:.3g}"
    if incomplete:
        headline += f"; {len(incomplete)} incomplete (budget)"
    if moving:
        headline += f"; moving errors: {', '.join(moving[:3])}"
    return ("pass" if not failed else "fail"), headline
