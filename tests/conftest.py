"""Test configuration.

Without CUDA the Triton kernels run under Triton's CPU interpreter. TRITON_INTERPRET must be
set before any module that defines a @triton.jit kernel is imported, so it happens here, at
conftest import time, before the tests import mixpo. The benchmark scripts' modules
(benchmarks/, e.g. the roofline model) are importable from the tests.
"""
import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; on a shared machine extra OpenMP threads spin
    and make a run several times slower (subprocesses get OMP_NUM_THREADS=1 to match). Test
    modules that train a model use it: `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
