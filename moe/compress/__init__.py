"""Compression by the sparse top-k: pruning, quantization, distillation.

Modules:
  pruning: masks by top-k in magnitude (hard, soft), per layer or global,
    the cubic sparsity schedule.
  quantization: per-channel fake quantization of kernels and per-row of
    activations, straight-through gradients.
  distillation: knowledge distillation losses, one way and mutual.
  phases: PQK's phase schedule (dense, prune, warm-up, mutual) and its mask
    events.
  student_file: the compressed student in one file (packed codes, bitmask),
    its loader and `predict`.

The PQK task that trains with them is `moe.train.pqk_task`.
"""
