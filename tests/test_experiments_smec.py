"""Tests of experiments/smec_dims.py: the rows, the baselines, a tiny run."""
import types

import numpy as np
import pytest

from moe.train import tasks

import experiments_testing

smec_script = experiments_testing.import_script("smec_dims")
TRAINED = [key for key, row in smec_script.ROWS.items() if row.trained]


def _args(**overrides):
  fields = dict(config_arg=None, stage_steps=200, dataset=None,
                data_dir=None, backbone_workdir="/nonexistent/backbone")
  return types.SimpleNamespace(**{**fields, **overrides})


@pytest.mark.parametrize("key", TRAINED)
def test_trained_rows_train_the_same_steps_with_their_method(key):
  config = smec_script.run_config(_args(), smec_script.ROWS[key], seed=2)
  task = tasks.create_task(config)
  assert config.total_steps == 600 and config.seed == 2
  assert config.dataset.seed == 2
  assert task.backbone == "/nonexistent/backbone"
  assert task.method == ("mrl" if key == "mrl" else "smec")
  assert task.num_stages == (1 if key == "mrl" else 3)
  assert config.evaluation.every_steps == 200
  if key != "mrl":
    assert task.selector == ("gumbel_topk" if "gumbel" in key
                             else "sparse_topk")
  assert task.cross_batch_memory == key.endswith("_xbm")


def test_truncation_and_random_keep_d_columns():
  rng = np.random.default_rng(0)
  train, queries = rng.normal(size=(50, 12)), rng.normal(size=(7, 12))
  corpus, q = smec_script.compress("truncate", train, queries, 5, seed=0)
  np.testing.assert_array_equal(corpus, train[:, :5])
  np.testing.assert_array_equal(q, queries[:, :5])
  picks = []
  for seed in (0, 1):
    corpus, q = smec_script.compress("random", train, queries, 5, seed)
    columns = [int(np.flatnonzero(np.all(train == col[:, None], axis=0))[0])
               for col in corpus.T]
    assert len(set(columns)) == 5 and columns == sorted(columns)
    np.testing.assert_array_equal(q, queries[:, columns])
    picks.append(columns)
  assert picks[0] != picks[1]
  full = smec_script.compress("full", train, queries, 5, seed=0)
  assert full[0] is train and full[1] is queries
  with pytest.raises(ValueError, match="no untrained row 'mrl'"):
    smec_script.compress("mrl", train, queries, 5, seed=0)


def test_pca_matches_the_covariance_eigenvectors():
  rng = np.random.default_rng(1)
  scales = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
  train = rng.normal(size=(400, 6)) * scales @ np.linalg.qr(
      rng.normal(size=(6, 6)))[0] + 3.0
  queries = rng.normal(size=(9, 6))
  corpus, q = smec_script.compress("pca", train, queries, 3, seed=0)
  eigenvalues, eigenvectors = np.linalg.eigh(np.cov(train.T))
  top = eigenvectors[:, ::-1][:, :3]
  centred = train - train.mean(axis=0)
  # Same subspace and variances; each direction is defined up to its sign.
  np.testing.assert_allclose(np.abs(corpus), np.abs(centred @ top),
                             atol=1e-8)
  np.testing.assert_allclose(np.abs(q), np.abs(
      (queries - train.mean(axis=0)) @ top), atol=1e-8)
  np.testing.assert_allclose(corpus.var(axis=0, ddof=1),
                             eigenvalues[::-1][:3], rtol=1e-8)


def test_bad_flags_are_errors(tmp_path):
  with pytest.raises(ValueError, match="--stage-steps must be >= 1"):
    smec_script.parse_args(["--stage-steps", "0"])
  with pytest.raises(ValueError, match="--seeds must be >= 1"):
    smec_script.parse_args(["--seeds", "0"])
  with pytest.raises(ValueError, match="--backbone .* is not a directory"):
    smec_script.parse_args(["--backbone", str(tmp_path / "missing")])
  with pytest.raises(SystemExit):
    smec_script.parse_args(["--rows", "magic"])


@pytest.mark.slow
def test_tiny_run_writes_every_row(tmp_path, mnist5k_data_dir):
  paths = smec_script.main([
      "--out", str(tmp_path), "--config-arg", "runlocal", "--stage-steps",
      "3", "--seeds", "2", "--rows", "full", "truncate", "random", "pca",
      "smec_sparse", "--data-dir", mnist5k_data_dir])
  results = experiments_testing.read_outputs(paths, ["ndcg_vs_dims.png"])
  dims = results["config"]["dims"]
  assert results["config"]["width"] == 32 and dims == [16, 8, 4]
  assert (tmp_path / "backbone" / "checkpoints").is_dir()
  cells = {cell["row"]: cell for cell in results["cells"]}
  assert list(cells) == ["full", "truncate", "random", "pca", "smec_sparse"]
  for cell in cells.values():
    for name in smec_script.METRICS:
      for d in dims:
        stats = cell[f"{name}_d{d}"]
        assert 0 <= stats["mean"] <= 1 and stats["num_seeds"] == 2
  full = cells["full"]["ndcg10_d16"]
  assert full["std"] == 0 and cells["full"]["ndcg10_d4"] == full
  # The trainer's eval of the full embeddings = the script's direct one.
  assert cells["smec_sparse"]["ndcg10_full"]["per_seed"] == pytest.approx(
      [full["mean"]] * 2, abs=1e-5)
  assert cells["truncate"]["ndcg10_d4"]["std"] == 0
  assert cells["random"]["ndcg10_d4"]["per_seed"][0] != (
      cells["random"]["ndcg10_d4"]["per_seed"][1])
  assert cells["smec_sparse"]["wall_s"]["mean"] > 0
  table = open(paths["results.md"]).read()
  assert "| SMEC, sparse top-k |" in table and "ndcg@10:" in table
