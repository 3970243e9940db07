"""moe: sparse mixture-of-experts on differentiable, exactly sparse top-k operators."""

__version__ = "0.1.0"
