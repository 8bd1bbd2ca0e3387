"""Test configuration.

Without CUDA the Triton kernels run under Triton's CPU interpreter. TRITON_INTERPRET must be
set before any module that defines a @triton.jit kernel is imported, so it happens here, at
conftest import time, before the tests import mixpo.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
