"""Tests of experiments/moe_router.py: metric extraction and a tiny run."""
import types

import pytest

from moe.config import schema
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


@pytest.mark.parametrize("row, gate_support", [
    ("sparse_topk", 3.0), ("vmoe_top_k", 2.0), ("experts_choice", 2.0),
    ("sparse_experts_choice", 2.0), ("soft_moe", 8.0), ("dense", None)])
def test_router_metrics(row, gate_support):
  metrics = router_script.router_metrics(
      router_script.ROWS[row], {"num_experts": 8, "num_selected_experts": 2},
      _result(), 45.0)
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


def test_run_config_changes_only_the_row_and_seed():
  args = router_script.parse_args(["--data-dir", "/data"])
  base = training_runs.load_config("digits_vmoe.py")
  base_router = routers.create_router(
      base.model.encoder.moe.router, num_experts=8, num_selected_experts=2)
  for key, row in router_script.ROWS.items():
    config = router_script.run_config(args, row, seed=2)
    assert (config.seed, config.dataset.seed) == (2, 2)
    assert config.total_steps == 500
    assert config.dataset.data_dir == "/data"
    assert config.model.hidden_size == base.model.hidden_size
    if row.router is None:   # 2 of 4 blocks with K = 2: width 128 * 6 / 4
      assert config.model.encoder.moe is None
      assert config.model.encoder.mlp_dim == 192
      continue
    moe, base_moe = config.model.encoder.moe, base.model.encoder.moe
    assert moe.router.name == row.router
    assert (moe.num_experts, moe.num_selected_experts, moe.layers) == (
        base_moe.num_experts, base_moe.num_selected_experts, base_moe.layers)
    assert moe.router.capacity_factor == base_moe.router.capacity_factor
    router = routers.create_router(moe.router, num_experts=8,
                                   num_selected_experts=2)
    # Every MoE row has vmoe's capacity rounding: the same buffers.
    assert router.capacity(17, train=True) == 8
    for field, value in row.fields.items():
      assert getattr(router, field) == value, (key, field)
    unchanged = set(schema.field_names(type(router))) - set(row.fields) - {
        "capacity_multiple_of", "regularization_steps", "name", "parent"}
    for field in unchanged & set(schema.field_names(type(base_router))):
      assert getattr(router, field) == getattr(base_router, field), (key,
                                                                     field)
  annealed = router_script.run_config(
      args, router_script.ROWS["sparse_topk_annealed"], seed=0)
  assert annealed.model.encoder.moe.router.regularization_steps == 500
  vmoe = router_script.ROWS["vmoe_top_k"].fields
  assert 0.01 * vmoe["importance_loss_weight"] == 0.005   # vmoe's weights
  with pytest.raises(ValueError, match="--steps must be >= 1"):
    router_script.parse_args(["--steps", "0"])


def test_dense_width_matches_the_per_token_flops():
  moe = types.SimpleNamespace(layers="every_2", num_selected_experts=2)
  assert router_script.dense_mlp_dim(moe, 4, 128) == 192
  moe = types.SimpleNamespace(layers=(1,), num_selected_experts=3)
  assert router_script.dense_mlp_dim(moe, 2, 32) == 64


@pytest.mark.slow
def test_tiny_run_writes_every_field(tmp_path, digits_data_dir):
  paths = router_script.main([
      "--out", str(tmp_path), "--config-arg", "runlocal", "--steps", "4",
      "--seeds", "1", "--rows", "soft_moe", "dense",
      "--data-dir", digits_data_dir])
  results = experiments_testing.read_outputs(
      paths, ["router_comparison.png", "accuracy_vs_step_time.png"])
  assert set(results) == {"config", "routers", "runtime_seconds"}
  assert results["config"]["total_steps"] == 4
  assert results["config"]["num_experts"] == 8
  assert list(results["routers"]) == ["soft_moe", "dense"]
  columns = {key for key, _, _ in router_script.COLUMNS} | {"wall_s"}
  for summary in results["routers"].values():
    assert set(summary) == columns
    for stats in summary.values():
      assert set(stats) == {"mean", "std", "num_seeds", "per_seed"}
      assert stats["num_seeds"] == 1
    assert 0 <= summary["accuracy"]["mean"] <= summary["top5"]["mean"] <= 1
    assert summary["step_ms"]["mean"] > 0
    assert summary["flops_per_token"]["mean"] > 0
  soft, dense = results["routers"].values()
  assert soft["dropped_fraction"]["mean"] == 0
  assert soft["gate_support"]["mean"] == 8
  assert dense["load_cv"]["mean"] is None
  assert dense["params"]["mean"] < soft["params"]["mean"]
  table = open(paths["results.md"]).read()
  assert "| dense ViT | " in table and "| SoftMoE | paper:" in table
