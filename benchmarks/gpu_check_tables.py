"""The tables of benchmarks/gpu_check.py's report: the summary table (one row per stage,
printed last) and gpu_check.md's detail tables, one per stage's details (correctness cases,
linear_loss implementations, backward tile skipping, logits_loss, training)."""
from __future__ import annotations

from gpu_check_common import _fmt


def detail_tables(report: dict) -> list[str]:
    """Markdown tables of the stages' details (what gpu_check.md shows below the summary)."""
    tables = []
    stages = {stage["stage"]: stage.get("details", {}) for stage in report["stages"]}
    cases = stages.get("correctness", {}).get("cases", [])
    if cases:
        lines = ["## correctness (max error over runs / threshold)", "",
                 "| case | runs | max error | threshold | pass | moving |",
                 "|---|---|---|---|---|---|"]
        for case in cases:
            lines.append(f"| {case['case']} | {case['runs']} | {case['max_error']:.3g} | "
                         f"{case['threshold']:g} | {'yes' if case['pass'] else 'NO'} | "
                         f"{', '.join(case['moving'])} |")
        tables.append("\n".join(lines))
    impls = stages.get("linear_loss", {}).get("impls", {})
    if impls:
        lines = ["## linear_loss (fwd+bwd; fwd in brackets)", "",
                 "| impl | ms | peak MiB | x mixpo time | x mixpo memory | x 6nVH floor | "
                 "loss diff |",
                 "|---|---|---|---|---|---|---|"]
        for name, record in impls.items():
            fb, fw = record.get("forward_backward", {}), record.get("forward", {})
            if "ms" not in fb or "ms" not in fw:
                problem = record.get("skipped") or record.get("error") or fb.get("error") \
                    or fw.get("error")
                lines.append(f"| {name} | {problem} |||||| ")
                continue
            floor = fb.get("x_matmul_floor", {})
            lines.append(f"| {name} | {fb['ms']:.2f} ({fw['ms']:.2f}) | {fb['peak_extra_mib']:.0f} "
                         f"({fw['peak_extra_mib']:.0f}) | {fb.get('time_vs_mixpo', 1):.2f} | "
                         f"{_fmt(fb.get('memory_vs_mixpo', 1), '.2f')} | "
                         f"{', '.join(f'{k} {v:.2f}' for k, v in floor.items())} | "
                         f"{fb.get('loss_rel_diff_vs_mixpo', 0):.2e} |")
        tables.append("\n".join(lines))
    variants = stages.get("linear_loss", {}).get("backward_variants", {})
    if variants and "skipped" not in variants:
        lines = ["## logit-free backward variants", "", "| head | gemm ms (cuBLAS part) | "
                 "atomic ms | atomic + CCE filter ms (sorted vocabulary) | tiles kept "
                 "(sorted) | filter dhidden / dweight error |", "|---|---|---|---|---|---|"]
        for head, r in variants.items():
            if "gemm_ms" in r:
                lines.append(f"| {head} | {r['gemm_ms']:.2f} ({r['gemm_cublas_part_ms']:.2f}) | "
                             f"{r['atomic_exact_ms']:.2f} | {r['atomic_filtered_ms']:.2f} "
                             f"({r['atomic_filtered_sorted_ms']:.2f}) | "
                             f"{r['kept_tile_fraction']:.1%} "
                             f"({r['kept_tile_fraction_sorted']:.1%}) | "
                             f"{r['filter_error_dhidden']:.2e}"
                             f" / {r['filter_error_dweight']:.2e} |")
        passes = variants.get("passes", {})
        for name in ("two_passes", "one_pass"):
            if "fwd_bwd_ms" in passes.get(name, {}):
                lines.append(f"| loss fwd+bwd, {name.replace('_', ' ')} | "
                             f"{passes[name]['fwd_bwd_ms']:.2f} |||||")
        tables.append("\n".join(lines))
    logits = stages.get("logits_loss", {}).get("impls", {})
    if logits:
        lines = ["## logits_loss", "", "| impl | fwd ms | fwd+bwd ms | fwd+bwd peak MiB | "
                 "x two reads | x floor |", "|---|---|---|---|---|---|"]
        for name, record in logits.items():
            fw, fb = record.get("forward", {}), record.get("forward_backward", {})
            lines.append(f"| {name} | {fw.get('ms', float('nan')):.2f} | "
                         f"{fb.get('ms', float('nan')):.2f} | "
                         f"{fb.get('peak_extra_mib', float('nan')):.0f} | "
                         f"{fb.get('x_two_reads', float('nan')):.2f} | "
                         f"{fb.get('x_floor', float('nan')):.2f} |")
        tables.append("\n".join(lines))
    summary = stages.get("training", {}).get("summary", {})
    if summary:
        lines = ["## training", "", "| run | tokens/s | peak GB |", "|---|---|---|"]
        for name in ("mixpo", "trl"):
            if name in summary:
                lines.append(f"| {name} | {summary[name]['tokens_per_s']:.0f} | "
                             f"{summary[name]['peak_gb'] or float('nan'):.2f} |")
        lines.append(f"| mixpo plan (no reserve) | | "
                     f"{summary['plan']['predicted_gb_without_reserve']:.2f} |")
        tables.append("\n".join(lines))
    return tables


def markdown_tables(report: dict) -> str:
    lines = [f"# gpu_check {report['date']} on {report['device']}"
             f"{' (--quick)' if report['quick'] else ''}", "", summary_table(report), ""]
    for table in detail_tables(report):
        lines += [table, ""]
    return "\n".join(lines)


def summary_table(report: dict) -> str:
    rows = ["| stage | verdict | time | budget | result |", "|---|---|---|---|---|"]
    for stage in report["stages"]:
        headline = str(stage.get("headline", "")).replace("|", "/").replace("\n", " ")
        rows.append(f"| {stage['stage']} | {stage['verdict'].upper()} | {stage['seconds']:.0f} s "
                    f"| {stage['budget_s']:.0f} s | {headline} |")
    total = report.get("total_seconds") or sum(stage["seconds"] for stage in report["stages"])
    failed = sum(stage["verdict"] == "fail" for stage in report["stages"])
    rows.append(f"| total | {'FAIL' if failed else 'PASS'} | {total:.0f} s | "
                f"{sum(s['budget_s'] for s in report['stages']):.0f} s | "
                f"{failed} stage(s) failed |")
    return "\n".join(rows)
