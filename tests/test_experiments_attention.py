"""Smoke test of experiments/bench_attention.py with the tiniest shapes."""
import json
import pathlib

from moe.nn import attention
import experiments_testing


def test_bench_attention_tiny_run(tmp_path):
  bench = experiments_testing.import_script("bench_attention")
  paths = bench.main(["--out", str(tmp_path), "--lengths", "3", "9",
                      "--batch-size", "1", "--repeats", "1"])
  results = experiments_testing.read_outputs(paths, [])
  rows = results["rows"]
  assert [(r["length"], r["sparsity"]) for r in rows] == [
      (length, sparsity) for length in (3, 9)
      for sparsity in attention.SPARSITIES]
  for row in rows:
    assert row["batch_size"] == 1 and row["ms"] > 0
    if row["sparsity"] == "dense":
      assert row["ratio_to_dense"] == 1.0
    assert row["ratio_to_dense"] > 0
  markdown = pathlib.Path(paths["results.md"]).read_text()
  assert "| 9 | 1 | sparse_topk |" in markdown
  assert json.loads(pathlib.Path(paths["results.json"]).read_text())[
      "config"]["cases"] == [[3, 1], [9, 1]]
