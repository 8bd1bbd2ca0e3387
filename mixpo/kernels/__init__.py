"""Triton kernels and their launch helpers (no autograd here; see mixpo/losses.py).

Modules: logits_logps (token log-probs over materialised logits), linear_logps (logit-free,
from hidden states and the LM-head weight), pair_loss (per-pair epilogue), margin_solve
(gamma-PO), configs (the launch-configuration table), compile_check (sm_80/sm_90 compile).
"""
