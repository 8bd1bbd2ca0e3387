"""Backend dispatch: the one place that decides between a Triton kernel and its torch twin.

Every kernel `mixpo.kernels.<name>` has a plain-torch twin `mixpo.kernels.<name>_torch` with
the same function names, inputs and outputs. `backend="auto"` picks the kernel for CUDA
tensors and the twin otherwise; `"triton"` and `"torch"` force one. Kernel modules are
imported only when first used (and only they import triton), so a CPU-only install without
triton runs the torch backend.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

BACKENDS = ("auto", "triton", "torch")
LOWEST_TRITON = (3, 6)      # the oldest Triton the kernels are compiled with in CI (setup.py)

# Decided once, like Triton itself decides it: TRITON_INTERPRET must be set before any kernel
# module is imported (tests/conftest.py does it when there is no GPU).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tracing(*tensors) -> bool:
    """Whether the loss is being traced rather than run: under torch.compile / export, or on
    fake tensors (`FakeTensorMode`: shapes without data). Tracing allows no data-dependent
    shapes and no reads of tensor values on the host."""
    import torch

    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return any(tensor is not None and is_fake(tensor) for tensor in tensors)


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, "
                         f"got {backend!r}")
    return backend


def use_triton(backend: str, tensor) -> bool:
    """Whether `backend` runs the Triton kernels on `tensor`'s device (ValueError when it
    cannot: no triton installed, or a CPU tensor without the interpreter). On fake tensors
    nothing runs, so "triton" is accepted on any device (memory of the GPU path measured on
    a CPU)."""
    check_backend(backend)
    if backend == "torch" or (backend == "auto" and not tensor.is_cuda):
        return False
    if importlib.util.find_spec("triton") is None:
        raise ValueError("backend='triton' needs the triton package (pip install "
                         "'mixpo[triton]'); backend='torch' runs without it")
    _check_triton_version()
    if not tensor.is_cuda and not INTERPRET and not tracing(tensor):
        raise ValueError("backend='triton' on a CPU tensor needs Triton's interpreter: set "
                         "TRITON_INTERPRET=1 before importing mixpo, or use backend='torch'")
    return True


def _check_triton_version() -> None:
    import importlib.metadata

    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:        # a source build: trust it
        return
    parts = tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())
    if parts and parts < LOWEST_TRITON:
        raise ValueError(f"triton {version} is older than the oldest supported "
                         f"{'.'.join(map(str, LOWEST_TRITON))}; upgrade it or use "
                         "backend='torch'")


def kernel_ops(name: str, triton: bool):
    """The module implementing kernel `name`: mixpo.kernels.<name> (Triton) or its twin
    mixpo.kernels.<name>_torch."""
    return importlib.import_module(f"mixpo.kernels.{name}" + ("" if triton else "_torch"))
