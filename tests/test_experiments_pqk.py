"""Tests of experiments/pqk.py: the grid, the configs and a tiny run."""
import types

import pytest

from moe.train import tasks

import experiments_testing

pqk_script = experiments_testing.import_script("pqk")


def _args(**overrides):
  fields = dict(config_file="mnist5k_pqk_mlp.py", config_arg=None,
                steps=400, dataset=None, data_dir=None, seeds=3, seed=0,
                rows=list(pqk_script.ROWS), sparsities=[0.5, 0.8, 0.9, 0.95],
                bits=[32, 8, 4])
  return types.SimpleNamespace(**{**fields, **overrides})


def test_grid_has_every_cell_once():
  cells = list(pqk_script.cells(_args()))
  assert len(cells) == len(set(cells)) == 3 + 3 * 12 + 8
  assert ("dense", 0.0, 4) in cells and ("pqk_soft", 0.95, 32) in cells
  assert ("pruning_qat", 0.5, 32) not in cells   # = hard_pruning.


@pytest.mark.parametrize("row, prune, warmup", [
    ("dense", 0, 0), ("hard_pruning", 267, 0), ("pruning_qat", 267, 0),
    ("pqk", 133, 40), ("pqk_soft", 133, 40)])
def test_every_row_trains_the_same_steps_with_its_phases(row, prune, warmup):
  config = pqk_script.run_config(_args(), pqk_script.ROWS[row], 0.9, 4,
                                 seed=1)
  task = tasks.create_task(config)
  assert config.total_steps == 400 and config.seed == 1
  assert (task.prune_steps, task.warmup_steps) == (prune, warmup)
  assert task.sparsity == (0.0 if row == "dense" else 0.9)
  assert (task.weight_bits, task.activation_bits) == (4, 8)
  assert task.qat == (row not in ("dense", "hard_pruning"))
  assert task.pruning_method == ("soft" if row == "pqk_soft" else "hard")
  float_config = pqk_script.run_config(_args(), pqk_script.ROWS[row], 0.9,
                                       32, seed=0)
  assert float_config.task.activation_bits == 32


def test_bad_flags_are_errors():
  with pytest.raises(ValueError, match="--steps must be >= 30"):
    pqk_script.parse_args(["--steps", "10"])
  with pytest.raises(SystemExit):
    pqk_script.parse_args(["--rows", "magic"])


@pytest.mark.slow
def test_tiny_run_writes_every_field(tmp_path, mnist5k_data_dir):
  paths = pqk_script.main([
      "--out", str(tmp_path), "--config-arg", "runlocal", "--steps", "30",
      "--seeds", "1", "--rows", "pqk_soft", "dense", "--sparsities", "0.8",
      "--bits", "4", "--data-dir", mnist5k_data_dir])
  results = experiments_testing.read_outputs(paths, ["accuracy_vs_size.png"])
  assert [(c["row"], c["sparsity"], c["bits"]) for c in results["cells"]] == [
      ("pqk_soft", 0.8, 4), ("dense", 0.0, 4)]
  soft, dense = results["cells"]
  for cell in results["cells"]:
    assert 0 <= cell["accuracy"]["mean"] <= 1
    assert cell["size_kb"]["num_seeds"] == 1
  assert soft["measured_sparsity"]["mean"] == pytest.approx(0.8, abs=1e-3)
  assert dense["measured_sparsity"]["mean"] < 0.01
  assert soft["size_kb"]["mean"] < dense["size_kb"]["mean"] / 1.5
  table = open(paths["results.md"]).read()
  assert "| PQK (soft top-k pruning) | 80% |" in table
