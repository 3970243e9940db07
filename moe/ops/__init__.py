"""Differentiable, exactly sparse top-k operators and their baselines.

Public API (names are contracts):
  topk_mask, topk_magnitude          regularised top-k (Sander et al. 2023)
  hard_topk_mask, hard_topk_magnitude
  top_k_by_sort                      lax.top_k that stays sharded under SPMD
  isotonic_regression                exact PAV or Dykstra, differentiable
"""
from moe.ops.isotonic import isotonic_regression
from moe.ops.topk import hard_topk_magnitude
from moe.ops.topk import hard_topk_mask
from moe.ops.topk import topk_magnitude
from moe.ops.topk import top_k_by_sort
from moe.ops.topk import topk_mask

__all__ = [
    "hard_topk_magnitude",
    "hard_topk_mask",
    "isotonic_regression",
    "top_k_by_sort",
    "topk_magnitude",
    "topk_mask",
]
