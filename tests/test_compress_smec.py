"""moe.compress SMEC parts (dimension selection, rank loss, cross-batch
memory, retrieval metrics) and moe.data.array_data, against numpy."""
from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from moe import data as data_lib
from moe.compress import cross_batch_memory as xbm
from moe.compress import dimension_selection as selection
from moe.compress import rank_loss
from moe.compress import retrieval

WIDTH = 16


def _logits(seed=0, width=WIDTH):
  return jnp.asarray(np.random.default_rng(seed).permutation(width) * 0.1,
                     jnp.float32)


@pytest.mark.parametrize("selector", selection.SELECTORS)
@pytest.mark.parametrize("pool_size, d", [(16, 8), (8, 4), (8, 1)])
def test_train_masks_keep_d_of_the_pool(selector, pool_size, d):
  pool = jnp.asarray(np.sort(np.random.default_rng(pool_size).permutation(
      WIDTH)[:pool_size]))
  mask = np.asarray(selection.train_mask(
      _logits(), pool, d, selector=selector, rng=jax.random.key(1)))
  outside = np.setdiff1d(np.arange(WIDTH), np.asarray(pool))
  assert np.all(mask[outside] == 0)
  assert mask.sum() == pytest.approx(d, abs=1e-5)
  assert np.all((mask >= -1e-6) & (mask <= 1 + 1e-6))
  if selector != "sparse_topk":
    assert sorted(set(mask.tolist())) == ([0.0, 1.0] if d < WIDTH else [1.0])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), pool_size=st.integers(2, WIDTH),
       data=st.data())
def test_inference_keeps_exactly_the_top_d_of_the_pool(seed, pool_size,
                                                       data):
  d = data.draw(st.integers(1, pool_size - 1))
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal(WIDTH).astype(np.float32)
  pool = np.sort(rng.permutation(WIDTH)[:pool_size])
  kept = np.asarray(selection.kept_indices(jnp.asarray(logits),
                                           jnp.asarray(pool), d))
  expected = np.sort(pool[np.argsort(-logits[pool], kind="stable")[:d]])
  np.testing.assert_array_equal(kept, expected)
  embeddings = rng.standard_normal((3, WIDTH)).astype(np.float32)
  compressed = selection.select(jnp.asarray(embeddings), jnp.asarray(kept))
  assert compressed.shape == (3, d)
  np.testing.assert_array_equal(compressed, embeddings[:, expected])
  mask = selection.keep_mask(jnp.asarray(kept), WIDTH)
  np.testing.assert_array_equal(
      np.asarray(selection.pool_indices(mask, d)), expected)


def test_sparse_topk_gradient_reaches_the_logits():
  pool = jnp.arange(WIDTH)
  logits = _logits(3) * 0.3   # Spread less than λ: a partial support.

  def fn(x):
    mask = selection.train_mask(x, pool, 6, selector="sparse_topk",
                                regularization=0.5)
    return mask * jnp.arange(1.0, WIDTH + 1)

  check_grads(fn, (logits,), order=1, modes=("rev",), eps=1e-3,
              atol=1e-2, rtol=1e-2)
  grad = jax.grad(lambda x: jnp.sum(fn(x)))(logits)
  assert np.count_nonzero(np.asarray(grad)) >= 2


@pytest.mark.parametrize("selector", ["gumbel_topk", "hard_ste"])
def test_straight_through_gradients_reach_the_logits(selector):
  pool = jnp.arange(WIDTH)
  weights = jnp.arange(1.0, WIDTH + 1)

  def objective(x):
    mask = selection.train_mask(x, pool, 4, selector=selector,
                                rng=jax.random.key(0), temperature=0.5)
    return jnp.sum(mask * weights)

  grad = np.asarray(jax.grad(objective)(_logits()))
  assert np.all(np.isfinite(grad)) and np.count_nonzero(grad) >= 4
  if selector == "gumbel_topk":   # The relaxation's gradient: a descent
    step = _logits() + 0.5 * grad   # moves mass towards heavy weights.
    soft = lambda x: jnp.sum(selection.relaxed_topk(x, 4, 0.5) * weights)
    assert soft(step) > soft(_logits())


def test_relaxed_topk_sums_to_k_and_tends_to_the_hard_top_k():
  scores = _logits(5)
  soft = selection.relaxed_topk(scores, 5, temperature=1e-3)
  np.testing.assert_allclose(soft.sum(), 5, atol=1e-4)
  np.testing.assert_allclose(soft, selection.hard_topk(scores, 5), atol=1e-4)


@pytest.mark.parametrize("dims, message", [
    ((), "at least one size"), ((16, 8), r"in 1..15"), ((8, 0), r"in 1..15"),
    ((8, 8), "strictly decreasing"), ((4.0,), "an int")])
def test_bad_dims_are_clear_errors(dims, message):
  with pytest.raises(ValueError, match=message):
    selection.check_dims(dims, WIDTH, "config.task.dims")


def test_unknown_selector_is_a_clear_error():
  with pytest.raises(ValueError, match="selector must be one of gumbel_topk"):
    selection.train_mask(_logits(), jnp.arange(WIDTH), 2, selector="random")
  with pytest.raises(ValueError, match="needs an rng"):
    selection.train_mask(_logits(), jnp.arange(WIDTH), 2,
                         selector="gumbel_topk")


def _np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_rank_loss_matches_numpy_and_vanishes_on_equal_rankings():
  rng = np.random.default_rng(0)
  full = rng.standard_normal((6, 8)).astype(np.float32)
  neighbors = rng.standard_normal((6, 3, 8)).astype(np.float32)
  compressed = full * (np.arange(8) < 5)
  teacher = rank_loss.candidate_similarities(full, full, neighbors)
  student = rank_loss.candidate_similarities(
      compressed, compressed, neighbors * (np.arange(8) < 5))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(
      teacher[:, 6:], np.einsum("bd,bmd->bm", unit(full), unit(neighbors)),
      rtol=1e-5, atol=1e-6)
  valid = np.concatenate([~np.eye(6, dtype=bool), rng.random((6, 3)) > 0.3],
                         axis=1)
  tau = 0.1
  masked = lambda s: np.where(valid, np.asarray(s) / tau, -1e30)
  log_p, log_q = _np_log_softmax(masked(teacher)), _np_log_softmax(
      masked(student))
  expected = np.mean(np.sum(np.where(valid, np.exp(log_p) * (log_p - log_q),
                                     0), axis=1))
  loss = rank_loss.listwise_rank_loss(teacher, student, jnp.asarray(valid),
                                      tau)
  assert expected > 0
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert rank_loss.listwise_rank_loss(teacher, teacher + 0.3,
                                      jnp.asarray(valid), tau) < 1e-6
  grad = jax.grad(lambda s: rank_loss.listwise_rank_loss(
      teacher, s, jnp.asarray(valid), tau))(student)
  assert np.all(np.asarray(grad)[~valid] == 0)


def test_normalize_has_a_finite_gradient_at_zero():
  grad = jax.grad(lambda x: jnp.sum(rank_loss.normalize(x)))(
      jnp.zeros((2, 4)))
  assert np.all(np.isfinite(grad))


def test_memory_is_a_fifo_queue_and_mines_the_nearest_entries():
  rng = np.random.default_rng(1)
  memory = xbm.init_memory(5, 4)
  first, second = (rng.standard_normal((3, 4)).astype(np.float32)
                   for _ in range(2))
  memory = xbm.enqueue(memory, jnp.asarray(first))
  np.testing.assert_array_equal(memory["filled"], [1, 1, 1, 0, 0])
  memory = xbm.enqueue(memory, jnp.asarray(second))   # Wraps around.
  np.testing.assert_array_equal(memory["embeddings"],
                                np.concatenate([second[2:], first[1:],
                                                second[:2]]))
  assert int(memory["pointer"]) == 1
  queries = np.concatenate([second[:1],
                            rng.standard_normal((1, 4)).astype(np.float32)])
  neighbors, valid = xbm.hard_neighbors(memory, jnp.asarray(queries), 4)
  entries = np.asarray(memory["embeddings"])
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  sims = unit(queries) @ unit(entries).T
  sims[0, 3] = -np.inf   # The query itself (slot 3) is no pair.
  order = np.argsort(-sims, axis=1, kind="stable")[:, :4]
  np.testing.assert_array_equal(neighbors, entries[order])
  np.testing.assert_array_equal(valid, [[True] * 4, [True] * 4])
  _, empty_valid = xbm.hard_neighbors(xbm.init_memory(5, 4),
                                      jnp.asarray(queries), 2)
  assert not np.any(empty_valid)


@pytest.mark.parametrize("size, neighbors, batch, message", [
    (0, 1, 1, r"memory_size must be an int >= 1, got 0"),
    (-4, 1, 1, r"memory_size must be an int >= 1"),
    (8, 0, 4, r"memory_neighbors must be an int >= 1"),
    (8, 9, 4, r"memory_neighbors must be in 1..memory_size=8"),
    (8, 2, 16, r"must hold one global batch"),
])
def test_bad_memory_sizes_are_clear_errors(size, neighbors, batch, message):
  with pytest.raises(ValueError, match=message):
    xbm.check_sizes(size, neighbors, batch, "config.task")


def _np_retrieval(queries, qlabels, corpus, clabels, k_ndcg, k_recall, k_map):
  """Brute force from the definitions of moe.compress.retrieval."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  sims = unit(queries) @ unit(corpus).T
  out = {"ndcg": [], "recall": [], "map": []}
  for i, row in enumerate(sims):
    ranked = np.argsort(-row, kind="stable")
    rel = (clabels[ranked] == qlabels[i]).astype(float)
    total = int(rel.sum())
    if total == 0:
      for values in out.values():
        values.append(0.0)
      continue
    dcg = sum(rel[j] / np.log2(j + 2) for j in range(k_ndcg))
    ideal = sum(1 / np.log2(j + 2) for j in range(min(k_ndcg, total)))
    out["ndcg"].append(dcg / ideal)
    out["recall"].append(float(rel[:k_recall].any()))
    precision = [rel[:j + 1].mean() for j in range(k_map)]
    out["map"].append(sum(rel[j] * precision[j] for j in range(k_map))
                      / min(k_map, total))
  return {name: np.asarray(v) for name, v in out.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_metrics_match_numpy_brute_force(seed):
  rng = np.random.default_rng(seed)
  corpus = rng.standard_normal((60, 5)).astype(np.float32)
  queries = rng.standard_normal((9, 5)).astype(np.float32)
  clabels = rng.integers(0, 4, 60)
  qlabels = np.append(rng.integers(0, 4, 8), 7)   # The last: no relevant.
  got = retrieval.retrieval_metrics(
      jnp.asarray(queries), jnp.asarray(qlabels), jnp.asarray(corpus),
      jnp.asarray(clabels), ndcg_at=10, recall_at=3, map_at=25)
  expected = _np_retrieval(queries, qlabels, corpus, clabels, 10, 3, 25)
  np.testing.assert_allclose(got["ndcg@10"], expected["ndcg"], rtol=1e-5)
  np.testing.assert_allclose(got["recall@3"], expected["recall"])
  np.testing.assert_allclose(got["map@25"], expected["map"], rtol=1e-5)
  assert got["ndcg@10"][-1] == 0
  with pytest.raises(ValueError, match=r"map_at must be in 1..60"):
    retrieval.retrieval_metrics(queries, qlabels, corpus, clabels,
                                map_at=61)


def _rows(n=10):
  return {"x": np.arange(n * 2, dtype=np.float32).reshape(n, 2),
          "y": np.arange(n)}


def test_array_train_iterator_permutes_each_epoch_and_resumes():
  stream = data_lib.ArrayTrainIterator(_rows(), batch_size=4, seed=3)
  seen = np.concatenate([next(stream)["y"] for _ in range(5)])   # 2 epochs.
  for epoch in (0, 1):
    assert sorted(seen[10 * epoch:10 * (epoch + 1)]) == list(range(10))
  assert not np.array_equal(seen[:10], seen[10:])
  state = stream.get_state()
  assert state == {"epoch": 2, "index_in_epoch": 0}
  later = [next(stream)["y"] for _ in range(3)]
  resumed = data_lib.ArrayTrainIterator(_rows(), batch_size=4, seed=3,
                                        state=state)
  for expected in later:
    np.testing.assert_array_equal(next(resumed)["y"], expected)
  again = data_lib.ArrayTrainIterator(_rows(), batch_size=4, seed=3)
  np.testing.assert_array_equal(next(again)["x"][:, 0], seen[:4] * 2)
  with pytest.raises(ValueError, match="out of range"):
    again.set_state({"epoch": 0, "index_in_epoch": 10})
  with pytest.raises(ValueError, match="multiple of the process count"):
    data_lib.ArrayTrainIterator(_rows(), batch_size=3, seed=0,
                                process_count=2)


def test_array_train_iterator_splits_rows_over_processes():
  parts = [data_lib.ArrayTrainIterator(_rows(11), batch_size=4, seed=0,
                                       process_index=i, process_count=2)
           for i in range(2)]
  rows = [set(np.concatenate([next(p)["y"] for _ in range(5)]))
          for p in parts]
  assert rows == [set(range(5)), set(range(5, 10))]


def test_array_eval_data_covers_every_row_once_padded():
  passes = [list(data_lib.ArrayEvalData(_rows(11), batch_size=4,
                                        process_index=i, process_count=2))
            for i in range(2)]
  assert len(passes[0]) == len(passes[1]) == 3   # ceil(6 / 2) batches.
  real = np.concatenate([b["y"][b[data_lib.MASK_KEY]] for p in passes
                         for b in p])
  assert sorted(real) == list(range(11))
  assert all(b["x"].shape == (2, 2) for p in passes for b in p)
