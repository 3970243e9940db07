"""Tests of experiments/moe_router.py: metric extraction and a tiny run."""
import types

import pytest

from moe.nn import routers

import experiments_testing

router_script = experiments_testing.import_script("moe_router")
training_runs = experiments_testing.import_script("training_runs")

EVAL = {"eval_accuracy": 0.9, "eval_top5": 0.99,
        "eval_encoderblock_1/tokens_per_expert_cv": 0.2,
        "eval_encoderblock_3/tokens_per_expert_cv": 0.4,
        "eval_encoderblock_1/dropped_fraction": 0.1,
        "eval_encoderblock_3/dropped_fraction": 0.0,
        "eval_encoderblock_1/experts_per_token": 1.5,
        "eval_encoderblock_3/experts_per_token": 2.5,
        "eval_encoderblock_1/support_size": 2.5,
        "eval_encoderblock_3/support_size": 3.5,
        "eval_encoderblock_1/dropped_fraction_extra": 7.0}
TRAIN = {"train_encoderblock_1/dropped_fraction": 0.3,
         "train_encoderblock_3/dropped_fraction": 0.1}


def _result():
  return types.SimpleNamespace(eval_metrics=EVAL, train_metrics=TRAIN,
                               wall_s=12.0)


def test_layer_mean_matches_whole_metric_names_only():
  assert router_script.layer_mean(EVAL, "eval_", "dropped_fraction") == (
      pytest.approx(0.05))
  assert router_script.layer_mean(EVAL, "eval_", "load_loss") is None


@pytest.mark.parametrize("router, gate_support", [
    ("SparseTopK", 3.0), ("NoisyTopExpertsPerItem", 2.0),
    ("TopItemsPerExpert", 2.0)])
def test_router_metrics(router, gate_support):
  metrics = router_script.router_metrics(router, 2, _result(), 45.0)
  assert metrics == pytest.approx({
      "accuracy": 0.9, "top5": 0.99, "load_cv": 0.3,
      "dropped_fraction": 0.05, "experts_per_token": 2.0,
      "train_dropped_fraction": 0.2, "gate_support": gate_support,
      "step_ms": 45.0, "wall_s": 12.0})


def test_step_timer_median_skips_the_first_intervals():
  timer = training_runs.StepTimer()
  timer.intervals = [5.0, 4.0, 0.010, 0.012, 0.011, 9.0]
  assert timer.median_ms() == pytest.approx(11.5)
  assert timer.median_ms(skip=6) != timer.median_ms(skip=6)  # NaN.


def test_run_config_changes_only_router_and_seed():
  args = router_script.parse_args(["--data-dir", "/data"])
  base = training_runs.load_config("digits_vmoe.py")
  for router in router_script.ROUTERS:
    config = router_script.run_config(args, router, seed=2)
    assert config.model.encoder.moe.router.name == router
    assert (config.seed, config.dataset.seed) == (2, 2)
    assert config.total_steps == 500
    assert config.dataset.data_dir == "/data"
    moe, base_moe = config.model.encoder.moe, base.model.encoder.moe
    assert (moe.num_experts, moe.num_selected_experts, moe.layers) == (
        base_moe.num_experts, base_moe.num_selected_experts, base_moe.layers)
    assert moe.router.capacity_factor == base_moe.router.capacity_factor
    noisy = router == "NoisyTopExpertsPerItem"
    router_module = routers.create_router(
        moe.router, num_experts=moe.num_experts,
        num_selected_experts=moe.num_selected_experts)
    assert getattr(router_module, "noise_std", 0.0) == (1.0 if noisy else 0.0)
  with pytest.raises(ValueError, match="--steps must be >= 1"):
    router_script.parse_args(["--steps", "0"])


@pytest.mark.slow
def test_tiny_run_writes_every_field(tmp_path, digits_data_dir):
  paths = router_script.main([
      "--out", str(tmp_path), "--config-arg", "runlocal", "--steps", "4",
      "--seeds", "1", "--routers", "SparseTopK", "--data-dir",
      digits_data_dir])
  results = experiments_testing.read_outputs(paths, ["router_comparison.png"])
  assert set(results) == {"config", "routers", "runtime_seconds"}
  assert results["config"]["total_steps"] == 4
  assert results["config"]["num_experts"] == 8
  summary = results["routers"]["SparseTopK"]
  assert set(summary) == {key for key, _, _ in router_script.COLUMNS} | {
      "wall_s"}
  for stats in summary.values():
    assert set(stats) == {"mean", "std", "num_seeds", "per_seed"}
    assert stats["num_seeds"] == 1 and stats["mean"] == stats["per_seed"][0]
  assert 0 <= summary["accuracy"]["mean"] <= summary["top5"]["mean"] <= 1
  assert 0 <= summary["dropped_fraction"]["mean"] <= 1
  assert summary["gate_support"]["mean"] >= 1
  assert summary["step_ms"]["mean"] > 0
