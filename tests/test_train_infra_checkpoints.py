"""Tests of moe.checkpoints: orbax round trips on 8 fake devices."""
import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moe import checkpoints
from moe.train import optimizers
from moe.parallel import partitioning

EXPERT_RULES = (("Moe/.*", ("expert",)),)


def _sharded_state(mesh, seed=0):
  """A train state: sharded params, optimizer state, step and a typed rng."""
  rng = np.random.default_rng(seed)
  params = {"Moe": {"kernel": rng.normal(size=(4, 3, 5)).astype(np.float32)},
            "head": {"kernel": rng.normal(size=(5, 2)).astype(np.float32),
                     "bias": np.zeros(2, np.float32)}}
  tx = optimizers.create_optimizer(dict(
      name="adam", learning_rate=0.1, frozen_params=("head/bias",),
      accumulation_steps=2)).tx
  param_shardings = partitioning.param_shardings(params, mesh, EXPERT_RULES)
  abstract = {"params": params, "opt": jax.eval_shape(tx.init, params),
              "step": jax.ShapeDtypeStruct((), jnp.int32),
              "rng": jax.eval_shape(lambda: jax.random.key(0))}
  shardings = partitioning.shardings_like_params(abstract, params,
                                                 param_shardings, mesh)

  def init(p):
    grads = jax.tree.map(lambda x: x + 1.0, p)
    opt_state = tx.init(p)
    _, opt_state = tx.update(grads, opt_state, p)  # non-trivial moments.
    return {"params": p, "opt": opt_state, "step": jnp.int32(7 + seed),
            "rng": jax.random.key(seed)}

  return jax.jit(init, out_shardings=shardings)(params), shardings


def _assert_bitwise_equal(a, b):
  unwrap = lambda x: (jax.random.key_data(x)
                      if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(
      np.asarray(unwrap(x)), np.asarray(unwrap(y))), a, b)


@pytest.fixture
def mesh(eight_devices):
  return partitioning.create_mesh(2)


def _checkpointer(directory, **config):
  return checkpoints.Checkpointer(directory,
                                  checkpoints.CheckpointConfig(**config))


def test_round_trip_is_bitwise_with_shardings_and_data_state(tmp_path, mesh):
  state, shardings = _sharded_state(mesh)
  data_state = {"epoch": 2, "position": 1234, "files": ["a", "b"],
                "nested": {"seed": 0}}
  with checkpoints.Checkpointer.from_config(
      tmp_path, ml_collections.ConfigDict(dict(every_steps=1))) as ckpt:
    assert ckpt.save(5, state, data_state)
  assert os.path.isfile(tmp_path / "checkpoints/5/data/process_0.json")

  target = partitioning.abstract_arrays(state, shardings)
  with checkpoints.Checkpointer.from_config(tmp_path) as fresh:
    assert fresh.all_steps() == [5] and fresh.latest_step() == 5
    restored = fresh.restore_latest(target)
  assert restored.step == 5 and restored.data_state == data_state
  _assert_bitwise_equal(restored.state, state)
  assert jax.tree.structure(restored.state) == jax.tree.structure(state)
  jax.tree.map(lambda x, s: (x.sharding == s) or pytest.fail(f"{x.sharding}"),
               restored.state, shardings)
  assert restored.state["params"]["Moe"]["kernel"].sharding.spec == P("expert")


def test_restore_into_other_shardings(tmp_path, mesh):
  state, _ = _sharded_state(mesh)
  with _checkpointer(tmp_path, every_steps=1) as ckpt:
    ckpt.save(1, state, {})
  other_mesh = partitioning.create_mesh(4)
  replicated = jax.tree.map(lambda _: partitioning.replicated(other_mesh),
                            state)
  with _checkpointer(tmp_path) as ckpt:
    restored = ckpt.restore(1, partitioning.abstract_arrays(state, replicated),
                            with_data_state=False)
  assert restored.data_state == {}
  assert restored.state["params"]["Moe"]["kernel"].sharding.is_fully_replicated
  _assert_bitwise_equal(restored.state, state)


def test_keeps_last_k_and_saves_every_n_steps_or_when_forced(tmp_path, mesh):
  state, _ = _sharded_state(mesh)
  with _checkpointer(tmp_path, every_steps=2, keep=2,
                     asynchronous=False) as ckpt:
    saved = [step for step in range(1, 11) if ckpt.save(step, state, {})]
    assert saved == [2, 4, 6, 8, 10]
    assert ckpt.all_steps() == [8, 10]
    assert not ckpt.should_save(11)
    assert ckpt.save(11, state, {"final": True}, force=True)
    assert ckpt.all_steps() == [10, 11]
  assert sorted(os.listdir(tmp_path)) == ["10", "11"]


def test_keeps_best_checkpoint_by_metric(tmp_path, mesh):
  state, _ = _sharded_state(mesh)
  with _checkpointer(tmp_path, every_steps=1, keep=1, best_metric="accuracy",
                     asynchronous=False) as ckpt:
    for step, accuracy in [(1, 0.5), (2, 0.9), (3, 0.7), (4, 0.6)]:
      ckpt.save(step, state, metrics={"accuracy": accuracy})
    assert ckpt.all_steps() == [2, 4]
    with pytest.raises(ValueError, match="best_metric='accuracy' is missing"):
      ckpt.save(5, state, metrics={"loss": 1.0})


def test_resume_restores_the_latest_step(tmp_path, mesh):
  with _checkpointer(tmp_path, every_steps=1, keep=3) as ckpt:
    for seed in range(3):
      state, shardings = _sharded_state(mesh, seed)
      ckpt.save(10 * (seed + 1), state, {"position": seed})
  with _checkpointer(tmp_path) as ckpt:
    restored = ckpt.restore_latest(state)  # concrete arrays as the target.
  assert restored.step == 30 and restored.data_state == {"position": 2}
  _assert_bitwise_equal(restored.state, state)
  assert int(restored.state["step"]) == 9


def test_fresh_directory_restores_nothing(tmp_path, mesh):
  state, _ = _sharded_state(mesh)
  with checkpoints.Checkpointer.from_config(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.restore_latest(state) is None
    with pytest.raises(checkpoints.CheckpointError,
                       match="no checkpoint of step 3"):
      ckpt.restore(3, state)


def test_corrupted_latest_falls_back_with_a_warning(tmp_path, mesh, caplog):
  with _checkpointer(tmp_path, every_steps=1, keep=3) as ckpt:
    for seed in range(2):
      state, _ = _sharded_state(mesh, seed)
      ckpt.save(seed + 1, state, {"position": seed})
  for root, _, files in os.walk(tmp_path / "2" / "state"):
    for name in files:
      os.truncate(os.path.join(root, name), 0)
  first, _ = _sharded_state(mesh, 0)
  with caplog.at_level(logging.WARNING), _checkpointer(tmp_path) as ckpt:
    restored = ckpt.restore_latest(first)
  assert restored.step == 1
  _assert_bitwise_equal(restored.state, first)
  assert any("Skipping unreadable checkpoint" in r.getMessage()
             and "/2" in r.getMessage() for r in caplog.records)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"cannot restore the checkpoint .*/2"):
    checkpoints.restore_checkpoint(tmp_path / "2", first)


def data_files(directory):
  """The array-data files (tensorstore `d/` directories) under `directory`."""
  return [os.path.join(root, name) for root, _, names in os.walk(directory)
          if os.path.basename(root) == "d" for name in names]


def flip_bytes(path, count=4000):
  """Inverts `count` bytes in the middle of a file (its size unchanged)."""
  data = bytearray(open(path, "rb").read())
  start = max(len(data) // 2 - count // 2, 0)
  for i in range(start, min(start + count, len(data))):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))


def _two_steps(directory, mesh):
  with _checkpointer(directory, every_steps=1, keep=3) as ckpt:
    for seed in range(2):
      state, _ = _sharded_state(mesh, seed)
      ckpt.save(seed + 1, state, {"position": seed})
  return _sharded_state(mesh, 0)[0]


def _restore_latest_warnings(directory, target, caplog, **kwargs):
  with caplog.at_level(logging.WARNING), _checkpointer(directory) as ckpt:
    restored = ckpt.restore_latest(target, set_aside_unreadable=True,
                                   **kwargs)
  warnings = [r.getMessage() for r in caplog.records
              if "Skipping unreadable checkpoint" in r.getMessage()]
  return restored, warnings


def test_values_that_differ_from_their_checksums_are_set_aside(
    tmp_path, mesh, caplog):
  first = _two_steps(tmp_path, mesh)
  # Stands for values that changed on disk and still decode: the record no
  # longer matches what is restored.
  record_path = tmp_path / "2" / "integrity" / "process_0.json"
  record = json.loads(record_path.read_text())
  assert record["algorithm"] == "moe-sum-mix32-v1"
  record["checksums"]["params/Moe/kernel"] ^= 1
  record_path.write_text(json.dumps(record))
  restored, warnings = _restore_latest_warnings(tmp_path, first, caplog)
  assert restored.step == 1
  _assert_bitwise_equal(restored.state, first)
  assert len(warnings) == 1, warnings
  assert re.search(r"checkpoint .*/2 fails verification: 1 arrays differ "
                   r"from their checksums, first params/Moe/kernel\.$",
                   warnings[0]), warnings
  assert sorted(os.listdir(tmp_path)) == ["1", "2.unreadable"]


def test_non_finite_values_and_bad_data_states_are_set_aside(
    tmp_path, mesh, caplog, monkeypatch):
  first = _two_steps(tmp_path / "nan", mesh)
  state, _ = _sharded_state(mesh, 1)
  state["params"]["head"]["bias"] = state["params"]["head"]["bias"] * np.nan
  # A state that holds NaN is never saved...
  with _checkpointer(tmp_path / "nan", every_steps=1) as ckpt:
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"refusing to save step 3: 1 arrays of the state "
                       r"are not finite, first params/head/bias"):
      ckpt.save(3, state, force=True)
    # ... unless the check is bypassed, as a disk could.
    monkeypatch.setattr(checkpoints.manager.integrity, "non_finite",
                        lambda digest: [])
    ckpt.save(3, state, {"position": 1}, force=True)
  monkeypatch.undo()
  restored, warnings = _restore_latest_warnings(tmp_path / "nan", first,
                                                caplog)
  assert restored.step == 2
  assert "1 arrays hold NaN or infinity, first params/head/bias" in (
      warnings[0])

  _two_steps(tmp_path / "data", mesh)
  (tmp_path / "data" / "2" / "data" / "process_0.json").write_text("{}")

  def check(data_state):
    if set(data_state) != {"position"}:
      raise ValueError(f"bad keys {sorted(data_state)}")

  caplog.clear()
  restored, warnings = _restore_latest_warnings(
      tmp_path / "data", first, caplog, check_data_state=check)
  assert restored.step == 1 and restored.data_state == {"position": 0}
  assert "data state {} unusable: bad keys []" in warnings[0]


def test_restore_checkpoint_from_workdir_checkpoint_dir_or_step_dir(tmp_path,
                                                                    mesh):
  with checkpoints.Checkpointer.from_config(tmp_path, dict(every_steps=1)) as c:
    for seed in range(2):
      state, _ = _sharded_state(mesh, seed)
      c.save(seed + 1, state, {"position": seed})
  first, _ = _sharded_state(mesh, 0)
  for path, step in [(tmp_path, 2), (tmp_path / "checkpoints", 2),
                     (tmp_path / "checkpoints" / "1", 1)]:
    restored = checkpoints.restore_checkpoint(path, first)
    assert restored.step == step
    assert restored.data_state == {"position": step - 1}
  _assert_bitwise_equal(restored.state, first)


def test_relative_paths_save_and_restore_from_the_current_directory(
    tmp_path, mesh, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state, shardings = _sharded_state(mesh)
  with checkpoints.Checkpointer.from_config("run", dict(every_steps=1)) as c:
    assert c.directory == tmp_path / "run" / "checkpoints"
    assert c.save(3, state, {"position": 7})
  target = partitioning.abstract_arrays(state, shardings)
  for path in ("run", "run/checkpoints/3"):
    restored = checkpoints.restore_checkpoint(path, target)
    assert restored.step == 3 and restored.data_state == {"position": 7}
    _assert_bitwise_equal(restored.state, state)
  assert str(checkpoints.manager.absolute_path("gs://bucket/run")) == "gs://bucket/run"


def test_missing_or_empty_checkpoint_path_is_a_clear_error(tmp_path, mesh):
  state, _ = _sharded_state(mesh)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"checkpoint path .*/nowhere does not exist"):
    checkpoints.restore_checkpoint(tmp_path / "nowhere", state)
  (tmp_path / "empty").mkdir()
  with pytest.raises(checkpoints.CheckpointError, match=r"holds no checkpoint"):
    checkpoints.restore_checkpoint(tmp_path / "empty", state)


def test_checkpoint_config_errors(tmp_path):
  with pytest.raises(ValueError, match=r"config.checkpoint has unknown "
                     r"field\(s\) keep_last"):
    checkpoints.Checkpointer.from_config(tmp_path, dict(keep_last=2))
  with pytest.raises(ValueError, match=r"config.checkpoint.best_mode must be "
                     r"one of 'max', 'min'"):
    checkpoints.CheckpointConfig(best_mode="largest")
