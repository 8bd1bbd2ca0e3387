"""Stages 3 and 4 of benchmarks/gpu_check.py, the loss speed checks: linear_loss (the
logit-free loss at Llama-3 shape against trl, Liger, CCE and materialised logits, with the
Liger worker process and the backward tile-skipping measurement) and logits_loss
(mixpo.preference_loss over materialised logits against two reads of the logits). Each stage
function takes a `gpu_check_common.StageContext`, fills `ctx.details` (saving after every case), and
returns (verdict, one-line headline); its docstring says what it measures and how."""
from __future__ import annotations

import math
import pathlib

import torch

from gpu_check_common import _bench, _finish, _fmt, _free, _start, device_peaks, rel_error
from harness import (BETA, IGNORE_INDEX, MIB, PEERS, LogitsProducer, device, first_call,
                     generator, linear_inputs, linear_loss, linear_step, peak_extra_bytes,
                     stop_workers, trl_style_loss)

# What each implementation runs here (harness.LINEAR_LOSSES); "mixpo": its backend.
NOTES = {"materialised": "logits = hidden @ W.T, fp32 log_softmax, gather",
         "trl": "ChunkedLogProbFunction on the completion tokens, log-probs only",
         "liger": "LigerFusedLinearDPOLoss(use_ref_model=False, compiled=True): reference-free",
         "cce": "linear_cross_entropy(reduction='none', impl='cce'), summed per sequence"}


def _linear_impl(name: str):
    """(callable (hidden, weight, labels, ref) -> loss, note) or raises _Skip: Liger and CCE
    need CUDA (their Triton kernels / torch.compile path), a peer may not be installed."""
    cuda = torch.cuda.is_available()
    if name == "mixpo":
        from mixpo.kernels.dispatch import INTERPRET
        backend = "triton" if cuda or INTERPRET else "torch"
        return linear_loss("mixpo", BETA, backend=backend), f"backend {backend}"
    if name in ("liger", "cce") and not cuda:
        raise _Skip("needs CUDA (" + ("Triton / torch.compile path" if name == "liger"
                                      else "its Triton kernels") + ")")
    try:
        return linear_loss(name, BETA), NOTES[name]
    except ImportError as error:
        raise _Skip(f"{PEERS[name][0]} not importable ({error})") from None


class _Skip(Exception):
    pass


def _ratio(value, base, floor=1.0):
    """value / base, or None when base is below `floor` (e.g. a CPU peak of ~0 MiB)."""
    return value / base if base >= floor else None


def _linear_shapes(quick: bool) -> dict:
    if quick:   # fp32: the interpreter's bf16 conversions cost seconds a launch
        return dict(rows=2, seq_len=48, prompt=16, hidden=64, vocab=4000, model="quick",
                    dtype="float32")
    # 16 sequences x 1280 positions, 256 prompt each: 16384 completion tokens.
    return dict(rows=16, seq_len=1280, prompt=256, hidden=4096, vocab=128256,
                model="llama-3-8b", dtype="bfloat16")


def _linear_inputs(shape: dict):
    completion = shape["seq_len"] - shape["prompt"]
    return linear_inputs(shape["rows"], shape["seq_len"], shape["prompt"], shape["hidden"],
                         shape["vocab"], getattr(torch, shape["dtype"]),
                         ref_offset=completion * math.log(shape["vocab"]))


def _worker_linear_peer(spec: dict) -> dict:
    """One stage-3 implementation measured in a process of its own (Liger: its torch.compile
    can take longer than the stage has left, and a worker can be stopped on time)."""
    import types

    ctx = types.SimpleNamespace(quick=spec["quick"], has_time=lambda seconds: True)
    try:
        fn, note = _linear_impl(spec["impl"])
    except _Skip as reason:
        return {"skipped": str(reason)}
    return {"note": note, **_measure(ctx, fn, _linear_inputs(spec["shape"]), 0)}


def _measure(ctx, fn_loss, inputs, budget_hint):
    """Forward and forward+backward: median time (bench) and peak memory above the inputs."""
    result = {}
    for mode in ("forward", "forward_backward"):
        step = linear_step(fn_loss, inputs, backward=mode == "forward_backward")
        try:
            loss, warmup = first_call(step)
            seconds = _bench(ctx, step, warmed=True)
            result[mode] = {"ms": 1e3 * seconds, "warmup_s": round(warmup, 2), "loss": loss,
                            "peak_extra_mib": peak_extra_bytes(step) / MIB}
        except Exception as error:                   # noqa: BLE001 - recorded per mode
            message = f"{type(error).__name__}: {str(error)[:300]}"
            result[mode] = {"error": "out of memory" if "out of memory" in message.lower()
                            else message}
        _free()
        if not ctx.has_time(budget_hint):
            break
    return result


def _zipf_head(hidden, weight, alpha=2.5, noise=2.0):
    """A trained-like head: logits = unigram log-prior -alpha log(1 + id) (token ids in
    frequency order, as BPE vocabularies roughly are) + contextual noise of std `noise`."""
    prior = -alpha * torch.log1p(torch.arange(weight.shape[0], device=weight.device,
                                              dtype=torch.float32))
    w = weight.float() * noise          # weight ~ N(0, 1/H), hidden ~ N(0, 1): logits std 1
    w[:, 0] = prior
    h = hidden.clone()
    h[..., 0] = 1.0
    return h, w.to(weight.dtype)


def _atomic_tiles(num_tokens, vocab_size, hidden_size, dtype) -> int:
    """Programs the atomic backward launches (token tiles x vocab tiles, per vocab chunk)."""
    from mixpo.kernels.configs import choose, dweight_chunk_rows
    from mixpo.kernels.linear_logps import _spec_name

    launch = choose(_spec_name("linear_atomic_bwd", dtype), dtype=dtype, num_tokens=num_tokens)
    block_n, block_v = launch.block("BLOCK_N"), launch.block("BLOCK_V")
    chunk = vocab_size if dtype == torch.float32 else \
        dweight_chunk_rows(vocab_size, hidden_size, block_v)
    return sum(math.ceil(num_tokens / block_n) * math.ceil(min(chunk, vocab_size - v0) / block_v)
               for v0 in range(0, vocab_size, chunk))


def _backward_variants(ctx, hidden, weight, labels, ref, dtype):
    """What settles the defaults on a first GPU, per head (random; Zipf prior alpha 1, 1.5,
    2.5): the default GEMM backward (and its cuBLAS GEMMs alone, so the Triton gradient
    kernel's share and both GEMM efficiencies show), the atomic backward exact and with CCE's
    filter ("auto": eps / 32 of the dtype; also over the vocabulary sorted by mean logit),
    the kept-tile fractions and the filter's gradient
    error against the exact default; then the whole loss in two passes (default) vs one pass
    (passes=1, a 2 GiB workspace: fp32 dWeight accumulator for 16-bit weights)."""
    from mixpo.kernels.dispatch import INTERPRET
    if not (torch.cuda.is_available() or INTERPRET):
        return {"skipped": "needs the Triton kernels (CUDA or TRITON_INTERPRET=1)"}
    from mixpo.kernels import linear_logps as kernel
    from mixpo.kernels import linear_logps_torch as twin
    from mixpo.kernels.linear_logps_atomic import linear_token_logps_backward_atomic

    flat = labels.reshape(-1)
    rows = torch.nonzero(flat != IGNORE_INDEX).squeeze(1)
    targets = flat[rows]
    coef = torch.full((rows.shape[0],), -BETA / 2, device=device())
    heads = {"random (flat softmax)": (hidden, weight)}
    for alpha in (1.0, 1.5, 2.5):
        heads[f"zipf {alpha:g} (trained-like)"] = _zipf_head(hidden, weight, alpha)
    if ctx.quick:     # the same code paths for every head: one is enough to keep them running
        heads = {"zipf 2.5 (trained-like)": heads["zipf 2.5 (trained-like)"]}
    results = {}
    for label, (h, w) in heads.items():
        if not ctx.has_time(10 if torch.cuda.is_available() else 2):
            results[label] = {"skipped": "stage time budget"}
            break
        h2 = h.reshape(-1, h.shape[-1])
        _, lse, _ = kernel.linear_token_logps_forward(h2, w, None, targets, rows)
        kept = torch.zeros(1, dtype=torch.int32, device=device())

        def gemm(h2=h2, w=w, lse=lse):
            return kernel.linear_token_logps_backward(h2, w, None, targets, rows, lse, coef)

        workspace = twin.Workspace(twin.backward_layout(
            rows.shape[0], w.shape[0], w.shape[1], w.dtype, triton=True), h2.device)

        def gemms_only(h2=h2, w=w, workspace=workspace):   # the cuBLAS part, G left as is
            return twin.gemm_backward(h2, w, None, rows, lambda *args: None, w.dtype, 128,
                                      None, True, workspace)

        def atomic(eps, h2=h2, w=w, lse=lse, kept=kept, vocab_sorted=False):
            return linear_token_logps_backward_atomic(h2, w, None, targets, rows, lse, coef,
                                                      filter_eps=eps, kept=kept,
                                                      vocab_sorted=vocab_sorted)
        exact = gemm()
        filtered = atomic("auto")           # counts the kept tiles into `kept` too
        tiles = _atomic_tiles(rows.shape[0], w.shape[0], w.shape[1], dtype)
        kept_fraction = int(kept.item()) / max(tiles, 1)
        record = {"gemm_ms": 1e3 * _bench(ctx, gemm),
                  "gemm_cublas_part_ms": 1e3 * _bench(ctx, gemms_only),
                  "atomic_exact_ms": 1e3 * _bench(ctx, lambda: atomic(None)),
                  "atomic_filtered_ms": 1e3 * _bench(ctx, lambda: atomic("auto")),
                  "atomic_filtered_sorted_ms": 1e3 * _bench(
                      ctx, lambda: atomic("auto", vocab_sorted=True)),
                  "filter_error_dhidden": rel_error(filtered[0], exact[0])[0],
                  "filter_error_dweight": rel_error(filtered[1], exact[1])[0]}
        record["kept_tile_fraction"] = kept_fraction
        kept.zero_()
        atomic("auto", vocab_sorted=True)
        record["kept_tile_fraction_sorted"] = int(kept.item()) / max(tiles, 1)
        record["gemm_triton_part_ms"] = record["gemm_ms"] - record["gemm_cublas_part_ms"]
        results[label] = record
        del exact, filtered
        _free()
        ctx.save()
    results["passes"] = _passes(ctx, hidden, weight, labels, ref)
    return results


def _passes(ctx, hidden, weight, labels, ref) -> dict:
    """The whole loss, forward + backward: two passes (the default) and one pass (forced,
    2 GiB workspace), with the loss difference between them."""
    record = {}
    for name, options in (("two_passes", {"passes": 2}),
                          ("one_pass", {"passes": 1, "workspace_bytes": 2 * 2**30})):
        if not ctx.has_time(8 if torch.cuda.is_available() else 2):
            record[name] = {"skipped": "stage time budget"}
            continue
        step = linear_step(linear_loss("mixpo", BETA, backend="triton", **options),
                           (hidden, weight, labels, ref), backward=True)
        try:
            loss, _ = first_call(step)
            record[name] = {"fwd_bwd_ms": 1e3 * _bench(ctx, step, warmed=True), "loss": loss}
        except Exception as error:                   # noqa: BLE001 - recorded
            record[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        _free()
    if "loss" in record.get("one_pass", {}) and "loss" in record.get("two_passes", {}):
        record["loss_diff"] = abs(record["one_pass"]["loss"] - record["two_passes"]["loss"])
        record["one_pass_speedup"] = record["two_passes"]["fwd_bwd_ms"] \
            / record["one_pass"]["fwd_bwd_ms"]
    return record


BACKWARD_VARIANTS_S = 40     # stage-3 seconds kept for the backward variants


def _run_liger_worker(ctx, shape) -> dict:
    import shutil
    import tempfile

    work = pathlib.Path(tempfile.mkdtemp(prefix="gpu_check_liger_"))
    started = []
    try:
        run = _start(ctx, "linear_peer", {"impl": "liger", "shape": shape, "quick": ctx.quick},
                     work, started)
        result = _finish(ctx, run, reserve_s=BACKWARD_VARIANTS_S)
    finally:
        stop_workers(started)
        shutil.rmtree(work, ignore_errors=True)
    if "out of memory" in result.get("error", "").lower():
        result["error"] = "out of memory"
    return result


def stage_linear_loss(ctx):
    """The logit-free loss at Llama-3 shape against its peers.

    Problem: 16 sequences x 1280 positions (256 prompt each: 16384 completion tokens), H 4096,
    V 128256, bf16, sigmoid DPO (beta 0.1) from hidden [2B, T, H], weight [V, H] and
    precomputed reference log-probs. Implementations: mixpo.linear_preference_loss (Triton);
    trl 1.16's ChunkedLogProbFunction (the kernel behind add_fused_lm_head, called on the
    completion tokens as its CUDA path does, log-probs only); Liger's LigerFusedLinearDPOLoss
    (compiled, reference-free: its API re-runs a reference head instead of taking log-probs);
    CCE's linear_cross_entropy (reduction none, summed to sequence log-probs); materialised
    logits (hidden @ W.T, fp32 log_softmax). For each, forward and forward+backward: median
    time (triton.testing.do_bench), peak memory above the inputs (max_memory_allocated after a
    reset minus what was allocated before), the loss (a cross-check against mixpo's), ratios to
    mixpo, and time over the roofline floors (roofline.floor_seconds: linear_logps_fwd /
    linear_logps_fwd_bwd and the 6nVH matmul floor) on "h100", "h200" and this machine's
    measured ceilings. Backward variants (`_backward_variants`): the default GEMM backward (and
    its cuBLAS part alone), the atomic backward exact and with CCE's filter, the kept-tile
    fraction and the filter's gradient error, on a random head and Zipf(1, 1.5, 2.5)-prior
    heads; then the loss in two passes vs one pass.
    """
    import roofline

    shape = _linear_shapes(ctx.quick)
    dtype = getattr(torch, shape["dtype"])
    hidden, weight, labels, ref = _linear_inputs(shape)
    completion = int((labels != IGNORE_INDEX).sum())
    model_shape = roofline.SHAPES[shape["model"]] if shape["model"] in roofline.SHAPES else \
        roofline.ModelShape("quick", shape["hidden"], shape["vocab"])
    workload = roofline.Workload(model_shape, labels.numel(), completion, shape["rows"] // 2,
                                 {"bfloat16": "bf16", "float32": "fp32"}[shape["dtype"]])
    peaks = device_peaks(ctx.environment)
    floors = {f"{kernel}@{name}": roofline.floor_seconds(kernel, workload, peak)
              for kernel in ("linear_logps_fwd", "linear_logps_fwd_bwd",
                             "matmul_flop_floor_fwd_bwd") for name, peak in peaks.items()}
    ctx.details.update(shape=shape, dtype=shape["dtype"], completion_tokens=completion,
                       floors_s=floors, impls={})
    if not torch.cuda.is_available():
        ctx.details["note"] = "CPU run: the floors are GPU floors, the ratios mean nothing here"
    ctx.save()
    # Seconds an implementation needs; Liger (torch.compile on its first call) runs last, in a
    # worker process given what is left but BACKWARD_VARIANTS_S, so it cannot overrun the stage.
    cuda = torch.cuda.is_available()
    for name in ("mixpo", "trl", "cce", "materialised", "liger"):
        if not ctx.has_time((45 if name == "liger" else 10) if cuda else 3):
            ctx.details["impls"][name] = {"skipped": "stage time budget"}
            continue
        try:
            if name == "liger" and cuda:
                record = _run_liger_worker(ctx, shape)
            else:
                fn, note = _linear_impl(name)
                record = {"note": note, **_measure(ctx, fn, (hidden, weight, labels, ref), 3)}
        except _Skip as reason:
            record = {"skipped": str(reason)}
        except Exception as error:                   # noqa: BLE001 - a peer's failure is data
            record = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            if "out of memory" in str(error).lower():
                record["error"] = "out of memory"
        ctx.details["impls"][name] = record
        _free()
        ctx.save()
    impls = ctx.details["impls"]
    base = impls.get("mixpo", {})
    for record in impls.values():
        for mode in ("forward", "forward_backward"):
            if "ms" not in record.get(mode, {}) or "ms" not in base.get(mode, {}):
                continue
            kernel = "linear_logps_fwd" if mode == "forward" else "linear_logps_fwd_bwd"
            ours, theirs = base[mode], record[mode]
            theirs["time_vs_mixpo"] = theirs["ms"] / ours["ms"]
            theirs["memory_vs_mixpo"] = _ratio(theirs["peak_extra_mib"], ours["peak_extra_mib"])
            theirs["loss_rel_diff_vs_mixpo"] = abs(theirs["loss"] - ours["loss"]) \
                / abs(ours["loss"])
            seconds = theirs["ms"] / 1e3
            theirs["x_floor"] = {peak: seconds / floors[f"{kernel}@{peak}"] for peak in peaks}
            if mode == "forward_backward":
                theirs["x_matmul_floor"] = {
                    peak: seconds / floors[f"matmul_flop_floor_fwd_bwd@{peak}"] for peak in peaks}
    ctx.save()
    if ctx.has_time(20 if torch.cuda.is_available() else 3):
        ctx.details["backward_variants"] = _backward_variants(ctx, hidden, weight, labels, ref,
                                                              dtype)
    else:
        ctx.details["backward_variants"] = {"skipped": "stage time budget"}
    ctx.save()
    if "ms" not in base.get("forward_backward", {}):
        problem = base.get("error") or base.get("skipped") or base.get("forward_backward")
        return "fail", f"mixpo did not run: {problem}"
    fb = base["forward_backward"]
    parts = [f"mixpo fwd+bwd {fb['ms']:.1f} ms, {fb['peak_extra_mib']:.0f} MiB"]
    if torch.cuda.is_available():
        for floor_device in ("measured", "h200"):
            if floor_device in peaks:
                parts.append(f"{fb['x_matmul_floor'][floor_device]:.2f}x the 6nVH floor "
                             f"({floor_device})")
                break
    for name in ("trl", "liger", "cce", "materialised"):
        record = impls.get(name, {})
        if "time_vs_mixpo" in record.get("forward_backward", {}):
            theirs = record["forward_backward"]
            parts.append(f"{name} {theirs['time_vs_mixpo']:.2f}x mixpo's time, "
                         f"{_fmt(theirs['memory_vs_mixpo'], '.1f')}x its memory")
        else:
            problem = record.get("skipped") or record.get("error") \
                or record.get("forward_backward", {}).get("error", "?")
            parts.append(f"{name} {problem}"[:80])
    variants = ctx.details["backward_variants"]
    zipf = variants.get("zipf 2.5 (trained-like)", {})
    if "gemm_ms" in zipf:
        parts.append(f"bwd (zipf 2.5 head): gemm {zipf['gemm_ms']:.1f} ms, atomic "
                     f"{zipf['atomic_exact_ms']:.1f} ms, filtered {zipf['atomic_filtered_ms']:.1f}"
                     f" ms ({zipf['kept_tile_fraction']:.1%} tiles kept)")
    passes = variants.get("passes", {})
    if "one_pass_speedup" in passes:
        parts.append(f"one pass {passes['one_pass_speedup']:.2f}x two passes")
    return "pass", "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# Stage 4: the loss over materialised logits
# ----------------------------------------------------------------------------------------------
def stage_logits_loss(ctx):
    """mixpo.preference_loss over materialised logits, 2B = 16, T = 1024, V = 128256, bf16
    (256 prompt positions a row): forward and forward+backward with in-place backward (the
    gradient written into the logits buffer), out of place, and the TRL-style baseline (fp32
    log_softmax + gather). The logits come through an identity Function that drops their
    gradient, so no accumulated .grad copy is measured; the in-place variant reuses one buffer
    across calls (its values become gradients: timing does not depend on them). Median time
    (bench), peak memory above the inputs, and the time over two reads of the logits
    (2 x logits bytes / the copy bandwidth measured in stage 1, itself read + write bytes per
    second) and over roofline's token_logps_fwd_bwd floor on the measured ceilings.
    """
    import mixpo

    rows, seq_len, vocab, prompt = (4, 64, 4000, 16) if ctx.quick else (16, 1024, 128256, 256)
    gen = generator(0)
    logits = torch.randn(rows, seq_len, vocab, generator=gen, device=device(),
                         dtype=torch.float32).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (rows, seq_len), generator=gen, device=device())
    labels[:, :prompt] = IGNORE_INDEX
    ref = -torch.rand(rows, generator=gen, device=device()) * 100
    nbytes = logits.numel() * logits.element_size()
    copy_tb_s = ctx.environment.get("ceilings", {}).get("copy_tb_s")
    ideal = 2 * nbytes / (copy_tb_s * 1e12) if copy_tb_s else None
    ctx.details.update(shape={"rows": rows, "seq_len": seq_len, "vocab": vocab, "prompt": prompt},
                       logits_bytes=nbytes, two_reads_s=ideal, impls={})
    import roofline
    peaks = device_peaks(ctx.environment)
    workload = roofline.Workload(roofline.ModelShape("logits", 4096, vocab), rows * seq_len,
                                 rows * (seq_len - prompt), rows // 2, "bf16")
    floor = roofline.floor_seconds("token_logps_fwd_bwd", workload,
                                   peaks.get("measured", peaks["h200"]))
    ctx.details["token_logps_fwd_bwd_floor_s"] = floor
    buffer = logits.clone()
    variants = {"mixpo in-place": (buffer, True), "mixpo": (logits, False),
                "trl-style": (logits, None)}
    for name, (source, inplace) in variants.items():
        record = {}
        for mode in ("forward", "forward_backward"):
            if not ctx.has_time(5 if torch.cuda.is_available() else 2):
                record[mode] = {"skipped": "stage time budget"}
                continue
            backward = mode == "forward_backward"
            leaf = source.detach().requires_grad_(backward)

            def step(leaf=leaf, backward=backward, inplace=inplace):
                with torch.set_grad_enabled(backward):
                    x = LogitsProducer.apply(leaf) if backward else leaf
                    if inplace is None:
                        loss = trl_style_loss(x, labels, ref, BETA)
                    else:
                        loss = mixpo.preference_loss(x, labels, ref_logps=ref, beta=BETA,
                                                     inplace_backward=inplace and backward).loss
                    if backward:
                        loss.backward()
            try:
                seconds = _bench(ctx, step)
                record[mode] = {"ms": 1e3 * seconds,
                                "peak_extra_mib": peak_extra_bytes(step) / MIB}
                if ideal:   # forward: one read of the logits; forward+backward: two
                    record[mode]["x_one_read" if not backward else "x_two_reads"] = \
                        seconds / (ideal if backward else ideal / 2)
                if backward:
                    record[mode]["x_floor"] = seconds / floor
            except Exception as error:               # noqa: BLE001
                record[mode] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
            _free()
        ctx.details["impls"][name] = record
        ctx.save()
    main = ctx.details["impls"]["mixpo in-place"].get("forward_backward", {})
    if "ms" not in main:
        return "fail", f"mixpo in-place did not run: {main}"
    parts = [f"in-place fwd+bwd {main['ms']:.2f} ms, {main['peak_extra_mib']:.0f} MiB"]
    if ideal:
        parts.append(f"{main['x_two_reads']:.2f}x two reads of the logits")
    parts.append(f"{main['x_floor']:.2f}x roofline floor")
    trl = ctx.details["impls"]["trl-style"].get("forward_backward", {})
    if "ms" in trl:
        memory = _ratio(trl["peak_extra_mib"], main["peak_extra_mib"])
        parts.append(f"trl-style {trl['ms'] / main['ms']:.2f}x the time, "
                     f"{_fmt(memory, '.1f')}x the memory")
    return "pass", "; ".join(parts)
