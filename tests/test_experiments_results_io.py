"""Tests of experiments/results_io.py, the experiments' output conventions."""
import argparse
import importlib
import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture(scope="module")
def results_io():
  sys.path.insert(0, str(EXPERIMENTS))
  try:
    return importlib.import_module("results_io")
  finally:
    sys.path.remove(str(EXPERIMENTS))


def test_to_jsonable_numbers_become_floats(results_io):
  value = {"a": np.float32(0.5), "b": jnp.arange(3), "c": np.int64(4),
           "d": (1, "x", True, None), "e": float("nan"), "f": np.inf,
           "g": [jnp.float32(2.0)]}
  assert results_io.to_jsonable(value) == {
      "a": 0.5, "b": [0.0, 1.0, 2.0], "c": 4.0, "d": [1, "x", True, None],
      "e": None, "f": None, "g": [2.0]}
  with pytest.raises(TypeError, match="set"):
    results_io.to_jsonable({1, 2})


def test_mean_std(results_io):
  stats = results_io.mean_std([1.0, 2.0, 3.0])
  assert stats == {"mean": 2.0, "std": 1.0, "num_seeds": 3}
  assert results_io.mean_std([5.0])["std"] == 0.0
  assert results_io.format_mean_std([0.9, 0.92, 0.94], digits=2) == (
      "0.92 ± 0.02")
  with pytest.raises(ValueError):
    results_io.mean_std([])


def test_summarize_seeds(results_io):
  summary = results_io.summarize_seeds([{"top1": 0.9, "ms": 10.0},
                                        {"top1": 0.8, "ms": 30.0}])
  assert set(summary) == {"top1", "ms"}
  assert summary["ms"] == {"mean": 20.0, "std": pytest.approx(14.142136),
                           "num_seeds": 2, "per_seed": [10.0, 30.0]}
  assert summary["top1"]["mean"] == pytest.approx(0.85)


def test_markdown_table_aligns_numeric_columns(results_io):
  table = results_io.markdown_table(
      ["name", "value", "time"], [["a", 1.23456, "3.5*"], ["b", None, "-"]])
  assert table.splitlines() == [
      "| name | value | time |", "|---|---:|---:|", "| a | 1.235 | 3.5* |",
      "| b | - | - |"]
  with pytest.raises(ValueError, match="cells"):
    results_io.markdown_table(["one"], [[1, 2]])


def test_write_results(results_io, tmp_path, capsys):
  fig, axes = results_io.new_figure(1, 2)
  axes[0, 1].plot([0, 1], [1, 0])
  paths = results_io.write_results(tmp_path / "run", {"x": np.float32(1.5)},
                                   "| a |\n|---|", {"plot.png": fig})
  assert json.loads(pathlib.Path(paths["results.json"]).read_text()) == {
      "x": 1.5}
  assert pathlib.Path(paths["results.md"]).read_text() == "| a |\n|---|\n"
  assert pathlib.Path(paths["plot.png"]).read_bytes()[:4] == b"\x89PNG"
  assert "| a |" in capsys.readouterr().out


def test_output_flags(results_io):
  parser = argparse.ArgumentParser()
  results_io.add_output_flags(parser, "/some/where/my_experiment.py")
  args = parser.parse_args([])
  assert args.out == results_io.REPO_ROOT / "out" / "my_experiment"
  assert args.scale == "small"
  assert parser.parse_args(["--scale", "full"]).scale == "full"
