"""Compile every kernel configuration in `configs.KERNELS` for real GPUs, without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32))` runs Triton's whole
GPU pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin via ptxas) on the CPU. The CPU interpreter
accepts code that this pipeline rejects (tl.dot shapes and dtypes, block shapes, shared-memory
overflow), so this is how CI proves that what the dispatcher can launch compiles for A100 and
H100. Registers and spills come from `ptxas -v` on the produced PTX.

Run as `python -m mixpo.kernels.compile_check [--arch 80 90] [--json OUT]` with
TRITON_INTERPRET unset (the kernels must load as JIT functions, not interpreted ones).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

# Shared memory per thread block (opt-in maximum), bytes.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCH_NAMES = {80: "A100 (sm_80)", 90: "H100 (sm_90)"}


def _ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes reported by ptxas -v for the kernel in `ptx`."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        ptx_file = os.path.join(tmp, "kernel.ptx")
        with open(ptx_file, "w") as handle:
            handle.write(ptx)
        result = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}",
                                 ptx_file, "-o", os.path.join(tmp, "kernel.cubin")],
                                capture_output=True, text=True)
    report = result.stderr + result.stdout
    registers = re.search(r"Used (\d+) registers", report)
    spill_stores = re.search(r"(\d+) bytes spill stores", report)
    spill_loads = re.search(r"(\d+) bytes spill loads", report)
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_store_bytes": int(spill_stores.group(1)) if spill_stores else None,
            "spill_load_bytes": int(spill_loads.group(1)) if spill_loads else None}


def _specialization_hints(kernel, signature: dict) -> dict:
    """The divisibility hints the JIT adds to real launches, so the check compiles the same
    code: torch allocations are 16-byte aligned, and strides and hidden sizes of LLM tensors
    are multiples of 16. Without them Triton neither vectorises nor pipelines the loads, and
    shared memory and registers would be under-reported."""
    hints = {}
    for name, kind in signature.items():
        if kind.startswith("*") or name.startswith(("stride", "dstride")) \
                or name == "hidden_size":
            hints[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    return hints


def compile_variant(spec, dtype, flags, launch, arch):
    """Compile one (kernel, dtype, flags, launch config) for sm_`arch`; return a record."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = spec.kernel()
    constexprs = {**flags, **dict(launch.blocks)}
    signature = {**spec.signature(dtype), **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                       attrs=_specialization_hints(kernel, spec.signature(dtype)))
    record = {"kernel": spec.name, "arch": arch, "dtype": dtype, "flags": flags,
              "blocks": dict(launch.blocks), "num_warps": launch.num_warps,
              "num_stages": launch.num_stages}
    start = time.perf_counter()
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": launch.num_warps,
                                           "num_stages": launch.num_stages})
    except Exception as error:  # reported, the test fails on it
        record.update(ok=False, error=f"{type(error).__name__}: {str(error)[:2000]}")
        return record
    shared = int(compiled.metadata.shared)
    record.update(ok=shared <= SHARED_MEMORY_LIMIT[arch], shared_bytes=shared,
                  shared_limit=SHARED_MEMORY_LIMIT[arch],
                  seconds=round(time.perf_counter() - start, 2),
                  **_ptxas_usage(compiled.asm["ptx"], arch))
    if shared > SHARED_MEMORY_LIMIT[arch]:
        record["error"] = f"shared memory {shared} B > {SHARED_MEMORY_LIMIT[arch]} B"
    return record


def _compile_job(job):
    """One (kernel name, dtype, flags, launch config, arch) in a worker process."""
    from mixpo.kernels import configs

    name, dtype, flags, launch, arch = job
    return compile_variant(configs.KERNELS[name], dtype, flags, launch, arch)


def compile_all(archs=(80, 90), kernels=None, jobs=None):
    """Records for every variant of every registered kernel (or those named in `kernels`),
    compiled by `jobs` worker processes (default: one per CPU core)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET to compile kernels for the GPU")
    from concurrent.futures import ProcessPoolExecutor

    from mixpo.kernels import configs

    work = [(spec.name, dtype, flags, launch, arch)
            for spec in configs.KERNELS.values() if not kernels or spec.name in kernels
            for dtype, flags, launch in spec.variants() for arch in archs]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_compile_job(job) for job in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_job, work))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--kernel", nargs="*", help="only these kernel names")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--jobs", type=int, default=None,
                        help="worker processes (default: one per CPU core)")
    args = parser.parse_args(argv)
    records = compile_all(tuple(args.arch), args.kernel, args.jobs)
    for record in records:
        status = "ok " if record["ok"] else "FAIL"
        print(f"{status} sm_{record['arch']} {record['kernel']:<22} {record['dtype']} "
              f"{record['flags']} {record['blocks']} warps={record['num_warps']} "
              f"stages={record['num_stages']} shared={record.get('shared_bytes')} "
              f"regs={record.get('registers')} spills={record.get('spill_store_bytes')} "
              f"{record.get('error', '')}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(records, handle, indent=1)
    return 0 if all(record["ok"] for record in records) else 1


if __name__ == "__main__":
    sys.exit(main())
