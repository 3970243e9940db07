"""Tests of experiments/pruning_mlp.py: the pruned kernels and a tiny run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import ops
import experiments_testing

pruning = experiments_testing.import_script("pruning_mlp")

KERNEL = jax.random.normal(jax.random.key(0), (6, 5)) * 0.3
K = 7


def test_hard_forward_keeps_k_weights_and_gradient_is_straight_through():
  pruned = pruning.pruned_kernel(KERNEL, pruning.HARD, K, 1.0)
  np.testing.assert_array_equal(
      pruned, ops.hard_topk_magnitude(KERNEL.reshape(-1), K).reshape(6, 5))
  assert int(jnp.sum(pruned != 0)) == K
  cotangent = jax.random.normal(jax.random.key(1), KERNEL.shape)
  grad = jax.grad(lambda w: jnp.sum(
      pruning.pruned_kernel(w, pruning.HARD, K, 1.0) * cotangent))(KERNEL)
  np.testing.assert_allclose(grad, cotangent)  # Pruned weights included.


def test_soft_kernels_are_scale_normalised_topk_magnitude():
  flat = KERNEL.reshape(-1)
  # p = 2 is scale-equivariant: the RMS normalisation changes nothing.
  np.testing.assert_allclose(
      pruning.pruned_kernel(KERNEL, pruning.SOFT_P2, K, 0.5).reshape(-1),
      ops.topk_magnitude(flat, K, regularization=0.5, p=2.0), rtol=1e-5,
      atol=1e-7)
  # p = 4/3: λ is relative to the RMS, so scaling W scales the output.
  small = pruning.pruned_kernel(KERNEL, pruning.SOFT_P43, K, 0.5)
  large = pruning.pruned_kernel(100 * KERNEL, pruning.SOFT_P43, K, 0.5)
  np.testing.assert_allclose(large, 100 * small, rtol=1e-4, atol=1e-5)
  rms = jnp.sqrt(jnp.mean(flat ** 2))
  np.testing.assert_allclose(
      small.reshape(-1),
      rms * ops.topk_magnitude(flat / rms, K, regularization=0.5, p=4 / 3),
      rtol=1e-5, atol=1e-7)
  # Exactly sparse, with at least k nonzeros; evaluation keeps exactly k.
  assert K <= int(jnp.sum(small != 0)) < small.size
  evaluated = pruning.hard_pruned(small, K / small.size)
  assert int(jnp.sum(evaluated != 0)) == K
  assert pruning.pruned_kernel(KERNEL, pruning.DENSE, K, 0.5) is KERNEL


def test_keep_count_and_layer_sizes():
  assert pruning.keep_count(0.01, 640) == 6
  assert pruning.keep_count(0.001, 100) == 1
  assert pruning.layer_sizes(64, [32, 16]) == [(64, 32), (32, 16), (16, 10)]


def test_bad_flags_and_missing_dataset(tmp_path):
  with pytest.raises(ValueError, match="--keep-ratios must be in"):
    pruning.parse_args(["--keep-ratios", "1.5"])
  with pytest.raises(ValueError, match="--regularization must be > 0"):
    pruning.parse_args(["--regularization", "0"])
  with pytest.raises(FileNotFoundError, match="'mnist' is not prepared"):
    pruning.main(["--scale", "full", "--data-dir", str(tmp_path),
                  "--out", str(tmp_path / "out")])


@pytest.mark.slow
def test_tiny_run_writes_every_field(tmp_path, digits_data_dir):
  epochs, ratio = 2, 0.1
  paths = pruning.main([
      "--out", str(tmp_path), "--epochs", str(epochs), "--seeds", "2",
      "--keep-ratios", str(ratio), "--hidden-sizes", "16",
      "--data-dir", digits_data_dir])
  results = experiments_testing.read_outputs(
      paths, ["accuracy_vs_epoch.png", "accuracy_vs_keep_ratio.png"])
  assert set(results) == {"config", "runs", "runtime_seconds"}
  assert results["config"]["widths"] == [64, 16, 10]
  assert results["config"]["kept_per_layer"] == {"10%": [102, 16]}
  assert set(results["runs"]) == set(pruning.METHODS) | {"dense (unpruned)"}
  for method, by_ratio in results["runs"].items():
    assert list(by_ratio) == ["100%" if "unpruned" in method else "10%"]
    entry = next(iter(by_ratio.values()))
    assert set(entry) == {"final_accuracy", "per_seed", "curve_mean",
                          "curve_std", "train_nonzero_fraction",
                          "train_weights_accuracy"}
    assert len(entry["per_seed"]) == 2 and len(entry["curve_mean"]) == epochs
    assert entry["final_accuracy"]["mean"] == pytest.approx(
        np.mean(entry["per_seed"]))
    assert entry["curve_mean"][-1] == pytest.approx(
        entry["final_accuracy"]["mean"])
    assert all(0 <= a <= 1 for a in entry["per_seed"])
  nonzero = {m: results["runs"][m]["10%"]["train_nonzero_fraction"]["mean"]
             for m in pruning.METHODS}
  assert nonzero["hard"] == pytest.approx(118 / 1184)
  assert nonzero["dense"] == 1.0
  assert 118 / 1184 <= nonzero["soft p=2"] < 1
  assert 118 / 1184 <= nonzero["soft p=4/3"] < 1
