"""Test configuration.

Without CUDA the Triton kernels run under Triton's CPU interpreter. TRITON_INTERPRET must be
set before any module that defines a @triton.jit kernel is imported, so it happens here, at
conftest import time, before the tests import mixpo. The benchmark scripts' modules
(benchmarks/, e.g. the roofline model) are importable from the tests.
"""
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
