"""Tests of experiments/sparse_attention.py: feasibility, flags, a tiny run."""
import math

import pytest

import experiments_testing

script = experiments_testing.import_script("sparse_attention")
BASE = {"eval_loss": 0.02, "eval_exact_match": 0.99}


def _eval(step, edges, loss, exact):
  return {"step": step, "edge_fraction": edges, "loss": loss,
          "exact_match": exact}


def test_sparsest_feasible_keeps_the_constraints():
  history = [_eval(10, 0.9, 0.02, 0.99),
             _eval(20, 0.3, 0.05, 0.99),     # CE above 1.1 * 0.02 + 0.01.
             _eval(30, 0.4, 0.03, 0.98),     # Exact match 1 point down.
             _eval(40, 0.5, 0.031, 0.986),
             _eval(50, 0.5, 0.01, 1.0)]
  best = script.sparsest_feasible(history, BASE, tolerance=0.1,
                                  absolute_tolerance=0.01)
  assert best == history[3]                  # Ties: the earliest.
  assert script.sparsest_feasible(history[1:3], BASE, tolerance=0.1,
                                  absolute_tolerance=0.01) is None


def test_bad_flags_are_errors():
  with pytest.raises(ValueError, match="--steps must be >= 1"):
    script.parse_args(["--steps", "0"])
  with pytest.raises(ValueError, match="--ks must be >= 1"):
    script.parse_args(["--ks", "2", "0"])
  with pytest.raises(SystemExit):
    script.parse_args(["--methods", "magic"])


@pytest.mark.slow
def test_tiny_run_writes_every_field(tmp_path):
  paths = script.main([
      "--out", str(tmp_path), "--config-arg", "runlocal", "--steps", "4",
      "--seeds", "1", "--methods", "gated", "sparse_topk", "--ks", "2", "1"])
  results = experiments_testing.read_outputs(
      paths, ["attention_edges.png", "post_training.png"])
  cells = {cell["method"]: cell for cell in results["cells"]}
  assert list(cells) == ["base", "gated", "sparse_topk"]
  assert cells["base"]["edge_fraction"]["mean"] == 1.0
  runs = results["runs"]
  assert [r["method"] for r in runs][0] == "gated"
  assert [r["k"] for r in runs if r["method"] == "sparse_topk"] in ([2],
                                                                    [2, 1])
  for run in runs:
    assert [e["step"] for e in run["history"]] == [1, 2, 3, 4]
    for evaluation in run["history"]:
      assert 0 < evaluation["edge_fraction"] <= 1
  topk = [r for r in runs if r["method"] == "sparse_topk"][0]
  assert topk["history"][-1]["edge_fraction"] < 1
  for cell in cells.values():
    assert cell["feasible_seeds"] in (0, 1)
    mean = cell["edge_fraction"]["mean"]
    assert mean is None or 0 < mean <= 1 or math.isnan(mean)
  assert "| sparse top-k mask |" in open(paths["results.md"]).read()
  # A second call reuses every finished run: same histories, and the wall
  # times of the first call (kept in each workdir), not the reload's.
  again = experiments_testing.read_outputs(
      script.main(["--out", str(tmp_path), "--config-arg", "runlocal",
                   "--steps", "4", "--seeds", "1", "--methods", "gated",
                   "sparse_topk", "--ks", "2", "1"]),
      ["attention_edges.png", "post_training.png"])
  for first, second in zip(runs, again["runs"], strict=True):
    assert second["history"] == first["history"]
    assert second["wall_s"] == first["wall_s"]
