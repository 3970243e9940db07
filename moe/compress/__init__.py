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
  dimension_selection: SMEC's learnable dimension logits and selectors
    (Gumbel top-k, sparse top-k, hard straight-through).
  rank_loss: the listwise rank loss between full and compressed
    similarities.
  cross_batch_memory: S-XBM, a queue of embeddings mined for hard pairs.
  retrieval: nDCG@k, recall@k and mAP@k with class labels as relevance.

The tasks that train with them are `moe.train.pqk_task` and
`moe.train.smec_task`.
"""
