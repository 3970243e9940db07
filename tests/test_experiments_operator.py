"""Smoke and numerical tests of experiments/fig_operator.py, bench_dykstra.py.

The scripts are imported from experiments/ (as `python experiments/<script>.py`
would see them) and run through their `main(argv)` with tiny settings.

Closed forms used below, for k = 2, λ = 0.6 and x(s) = (3, 1, -1 + s, s):
the mask entries are exactly 0/1 (any p) when the gap between the 2nd and the
3rd largest entry is >= λ: saturated on [0, 0.4] ∪ [4.6, 5], exactly 0 on
[1.6, 3.4]. On [0.4, 1.6] the p = 2 curve is 1 - (s - 0.4) / (2λ), so its
derivative jumps by 1/(2λ). For the magnitude with p = 2 an entry is kept
whole when |x_i| >= γ (1 + λ): exactly 0 on [1.6, 8/3], saturated on
[0.375, 0.625], derivative jumps by (1 + λ)/λ; with p = 4/3 the curve is
saturated at s = 5 (x_3 = 4 >= γ + λ γ^(1/3) at γ = 3).
"""
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from moe import ops
import experiments_testing

LAMBDA = 0.6
NUM_POINTS = 51
STEP = 5.0 / (NUM_POINTS - 1)
P = {"hard": None, "p=2": 2.0, "p=4/3": 4 / 3}


@pytest.fixture(scope="module")
def fig_results(tmp_path_factory):
  out = tmp_path_factory.mktemp("fig_operator")
  paths = experiments_testing.import_script("fig_operator").main([
      "--out", str(out), "--num-points", str(NUM_POINTS), "--regularization",
      str(LAMBDA)])
  return experiments_testing.read_outputs(paths, ["fig_operator.png"]), paths


@pytest.fixture(scope="module")
def bench_results(tmp_path_factory):
  bench = experiments_testing.import_script("bench_dykstra")
  out = tmp_path_factory.mktemp("bench_dykstra")
  paths = bench.main(["--out", str(out), "--sizes", "1000", "--batched-sizes",
                      "32", "--batch-size", "4", "--iterations", "10", "100",
                      "500"])
  return experiments_testing.read_outputs(paths, ["time_vs_n.png", "error_vs_n.png"]), paths


def _direct(op, s, p):
  """Entries 2 and 3 (1-based) of op(x(s)) by a direct call of moe.ops."""
  x = jnp.array([3.0, 1.0, -1.0 + s, s])
  if p is None:
    return np.asarray({"mask": ops.hard_topk_mask,
                       "magnitude": ops.hard_topk_magnitude}[op](x, 2))[1:3]
  fn = {"mask": ops.topk_mask, "magnitude": ops.topk_magnitude}[op]
  return np.asarray(fn(x, 2, regularization=LAMBDA, p=p))[1:3]


def _assert_intervals(got, expected):
  """Same number of runs, each end within one grid step of the closed form."""
  assert len(got) == len(expected), (got, expected)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected),
                             atol=STEP + 1e-6)


def test_fig_operator_writes_every_field(fig_results):
  results, paths = fig_results
  assert set(results) == {"config", "coarse_grid", "intervals",
                          "derivative_jumps", "runtime_seconds"}
  assert results["config"]["num_points"] == NUM_POINTS
  grid = results["coarse_grid"]
  assert grid["s"] == [0.5 * i for i in range(11)]
  for kind in ("mask", "magnitude", "magnitude_derivative"):
    assert set(grid[kind]) == {"hard", "p=2", "p=4/3"}
    assert all(len(v) == 11 for v in grid[kind].values())
  for kind in ("mask", "magnitude"):
    for method in ("hard", "p=2", "p=4/3"):
      assert set(results["intervals"][kind][method]) == {"zero", "saturated"}
    for method in ("p=2", "p=4/3"):
      assert set(results["derivative_jumps"][kind][method]) == {
          "max_jump", "at_s", "max_jump_10x_finer", "at_s_10x_finer"}
  assert "exactly 0 on" in pathlib.Path(paths["results.md"]).read_text()


@pytest.mark.parametrize("op", ["mask", "magnitude"])
@pytest.mark.parametrize("method", ["hard", "p=2", "p=4/3"])
def test_fig_operator_curves_match_direct_calls(fig_results, op, method):
  coarse = fig_results[0]["coarse_grid"]
  expected = [_direct(op, s, P[method]).sum() for s in coarse["s"]]
  np.testing.assert_allclose(coarse[op][method], expected, rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize("method", ["p=2", "p=4/3"])
def test_fig_operator_derivative_matches_finite_differences(fig_results,
                                                            method):
  coarse = fig_results[0]["coarse_grid"]
  h = 1e-2
  for s in (1.0, 4.0):  # No kink within ±h of these s.
    fd = (_direct("magnitude", s + h, P[method]).sum() -
          _direct("magnitude", s - h, P[method]).sum()) / (2 * h)
    derivative = coarse["magnitude_derivative"][method][int(2 * s)]
    assert derivative == pytest.approx(fd, rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("method", ["p=2", "p=4/3"])
def test_mask_exact_values(fig_results, method):
  p = P[method]
  np.testing.assert_array_equal(_direct("mask", 0.0, p), [1.0, 0.0])
  np.testing.assert_array_equal(_direct("mask", 2.5, p), [0.0, 0.0])
  np.testing.assert_array_equal(_direct("mask", 5.0, p), [0.0, 1.0])
  # s = 1: x = (3, 1, 0, 1) puts the entries 1 and 1 in a tie: 1/2 each.
  np.testing.assert_allclose(_direct("mask", 1.0, p).sum(), 0.5, atol=1e-6)
  curve = fig_results[0]["coarse_grid"]["mask"][method]  # s = 0, 0.5, ..., 5
  assert [curve[i] for i in (0, 4, 5, 6, 10)] == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_magnitude_exact_values(fig_results):
  np.testing.assert_array_equal(_direct("magnitude", 2.0, 2.0), [0.0, 0.0])
  np.testing.assert_array_equal(_direct("magnitude", 2.0, 4 / 3), [0.0, 0.0])
  np.testing.assert_array_equal(_direct("magnitude", 0.5, 2.0), [1.0, 0.0])
  np.testing.assert_array_equal(_direct("magnitude", 5.0, 4 / 3), [0.0, 4.0])
  curves = fig_results[0]["coarse_grid"]["magnitude"]
  assert (curves["p=2"][1], curves["p=2"][4]) == (1.0, 0.0)
  assert (curves["p=4/3"][4], curves["p=4/3"][10]) == (0.0, 4.0)


def test_fig_operator_intervals(fig_results):
  intervals = fig_results[0]["intervals"]
  for kind in ("mask", "magnitude"):
    # Hard: ties at s = 1 and s = 4 go to the lower index.
    _assert_intervals(intervals[kind]["hard"]["zero"], [[1.1, 4.0]])
    _assert_intervals(intervals[kind]["hard"]["saturated"],
                      [[0.0, 1.0], [4.1, 5.0]])
  for method in ("p=2", "p=4/3"):
    _assert_intervals(intervals["mask"][method]["zero"], [[1.6, 3.4]])
    _assert_intervals(intervals["mask"][method]["saturated"],
                      [[0.0, 0.4], [4.6, 5.0]])
  _assert_intervals(intervals["magnitude"]["p=2"]["zero"], [[1.6, 8 / 3]])
  _assert_intervals(intervals["magnitude"]["p=2"]["saturated"],
                    [[0.375, 0.625]])
  assert intervals["magnitude"]["p=4/3"]["zero"][0][0] == pytest.approx(
      1.6, abs=STEP)
  assert intervals["magnitude"]["p=4/3"]["saturated"][-1][1] == 5.0


def test_fig_operator_derivative_jumps(fig_results):
  jumps = fig_results[0]["derivative_jumps"]
  # p = 2: true jumps, the same on a 10x finer grid.
  for kind, size in (("mask", 1 / (2 * LAMBDA)),
                     ("magnitude", (1 + LAMBDA) / LAMBDA)):
    assert jumps[kind]["p=2"]["max_jump"] == pytest.approx(size, rel=1e-3)
    assert jumps[kind]["p=2"]["max_jump_10x_finer"] == pytest.approx(
        size, rel=1e-3)
  # p = 4/3 mask: a continuous derivative, its grid jumps shrink with the step.
  mask = jumps["mask"]["p=4/3"]
  assert mask["max_jump_10x_finer"] < 0.2 * mask["max_jump"]
  # p = 4/3 magnitude: the output's linear term (s - γ) gives a jump of about
  # 1 where an entry enters the support.
  assert 0.9 < jumps["magnitude"]["p=4/3"]["max_jump_10x_finer"] < 1.2


def test_bench_dykstra_writes_fields_and_errors_decrease(bench_results):
  results, paths = bench_results
  assert set(results) == {"config", "rows", "runtime_seconds"}
  fields = {"operator", "layout", "rows", "n", "k", "solver", "num_iter",
            "time_ms", "timed_runs", "max_abs_error"}
  cases = {}
  for row in results["rows"]:
    assert set(row) == fields
    assert row["time_ms"] > 0 and row["timed_runs"] == 10
    cases.setdefault((row["operator"], row["layout"], row["n"]), []).append(row)
  assert len(cases) == 4
  for rows in cases.values():
    assert [r["solver"] for r in rows] == ["exact", "dykstra 10",
                                           "dykstra 100", "dykstra 500"]
    assert rows[0]["max_abs_error"] == 0.0
    errors = [r["max_abs_error"] for r in rows[1:]]
    assert all(b <= a + 1e-5 for a, b in zip(errors, errors[1:])), errors
  for operator in ("topk_mask", "topk_magnitude"):
    errors = [r["max_abs_error"] for r in cases[operator, "unbatched", 1000]]
    assert errors[-1] < 0.1 * errors[1], errors
