"""Triton kernels, their launch helpers and a plain-torch twin of each, and the custom ops
over them (`ops`: fake implementations and autograd; the loss's execution is
mixpo/functions.py).

Kernels: logits_logps (token log-probs over materialised logits), linear_logps (logit-free,
from hidden states and the LM-head weight; linear_logps_atomic its older atomic backward, kept
as an alternative), margin_solve (gamma-PO). Each `<name>.py` has a twin `<name>_torch.py`
with the same functions: the CPU backend and the test oracle. pair_loss: the per-pair loss of
every type, written once in torch ([B]-sized; autograd differentiates it).
dispatch (backend choice, the one TRITON_INTERPRET flag, `tracing`),
configs (the launch-configuration table), compile_check (sm_80/sm_90 compile without a GPU).
Only the kernel modules import triton.
"""
