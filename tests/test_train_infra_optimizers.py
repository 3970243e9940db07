"""Tests of moe.train.optimizers: schedules, masks, freezing, accumulation."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from moe.train import optimizers


def _params():
  """A ViT-like parameter tree with kernels, biases, norms and a head."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  return {
      "Transformer": {
          "encoderblock_0": {
              "MlpBlock": {"Dense_0": {"kernel": normal(3, 4),
                                       "bias": normal(4)}},
              "LayerNorm_0": {"scale": normal(3)},
          },
          "posembed_input": {"pos_embedding": normal(1, 5, 3)},
      },
      "head": {"kernel": normal(3, 2), "bias": normal(2)},
  }


def _grads(seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda p: rng.normal(size=p.shape).astype(np.float32), _params())


def _one_update(config, grads=None, params=None):
  params = _params() if params is None else params
  grads = _grads() if grads is None else grads
  tx = optimizers.create_optimizer(config, total_steps=100).tx
  updates, _ = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
  return updates


def _leaf(tree, name):
  for key in name.split("/"):
    tree = tree[key]
  return np.asarray(tree)


# ----------------------------------------------------------------- schedules

PEAK, WARMUP, DECAY, END = 0.5, 10, 110, 0.05


def _closed_form(name, step):
  """The schedule formulas of the ScheduleConfig docstring, in numpy."""
  if step < WARMUP:
    return PEAK * step / WARMUP
  t = step - WARMUP
  frac = min(t / (DECAY - WARMUP), 1.0)
  if name == "constant":
    return PEAK
  if name == "warmup_cosine":
    return END + (PEAK - END) * 0.5 * (1 + math.cos(math.pi * frac))
  if name == "warmup_linear":
    return END + (PEAK - END) * (1 - frac)
  return PEAK * math.sqrt(1000 / (t + 1000))


@pytest.mark.parametrize("name", optimizers.SCHEDULE_NAMES)
def test_schedule_matches_closed_form(name):
  config = optimizers.ScheduleConfig(name=name, warmup_steps=WARMUP,
                                     end_value=END, timescale=1000)
  schedule = optimizers.create_schedule(config, PEAK, total_steps=DECAY)
  for step in (0, 1, 5, 10, 11, 35, 60, 109, 110, 200, 5000):
    np.testing.assert_allclose(float(schedule(step)), _closed_form(name, step),
                               rtol=1e-5, atol=1e-7, err_msg=f"step {step}")


def test_schedule_explicit_decay_steps_and_no_warmup():
  config = optimizers.ScheduleConfig(name="warmup_linear", decay_steps=20)
  schedule = optimizers.create_schedule(config, 1.0, total_steps=1000)
  assert float(schedule(0)) == 1.0
  np.testing.assert_allclose(float(schedule(5)), 0.75)
  assert float(schedule(20)) == 0.0 and float(schedule(30)) == 0.0


def test_decaying_schedule_needs_decay_steps():
  config = optimizers.ScheduleConfig(name="warmup_cosine", warmup_steps=5)
  with pytest.raises(ValueError, match="decay_steps"):
    optimizers.create_schedule(config, 1.0, total_steps=None)
  with pytest.raises(ValueError, match="must exceed warmup_steps=5"):
    optimizers.create_schedule(config, 1.0, total_steps=5)


def test_learning_rate_counts_optimizer_updates_with_accumulation():
  optimizer = optimizers.create_optimizer(
      dict(name="sgd", learning_rate=1.0, accumulation_steps=4,
           schedule=dict(name="warmup_linear", warmup_steps=4,
                         decay_steps=8)))
  assert float(optimizer.learning_rate(7)) == 0.25  # update 1 of 4 warmup
  assert float(optimizer.learning_rate(16)) == 1.0
  assert float(optimizer.schedule(16)) == 0.0


# -------------------------------------------------------------- config errors

@pytest.mark.parametrize("config, message", [
    (dict(name="lamb", learning_rate=0.1),
     r"config.optimizer.name must be one of 'sgd', 'adam', 'adamw'; "
     r"got 'lamb'"),
    (dict(name="sgd", learning_rate=0.1, schedule=dict(name="step")),
     r"config.optimizer.schedule.name must be one of 'warmup_cosine', "
     r"'warmup_linear', 'warmup_rsqrt', 'constant'"),
    (dict(name="sgd", learning_rate=0.1, wieght_decay=0.1),
     r"config.optimizer has unknown field\(s\) wieght_decay; allowed"),
    (dict(name="sgd", learning_rate=0.1, schedule=dict(warmup=3)),
     r"config.optimizer.schedule has unknown field\(s\) warmup"),
    (dict(name="sgd"), r"config.optimizer must set learning_rate"),
    (dict(name="sgd", learning_rate=0.1, accumulation_steps=0),
     r"config.optimizer.accumulation_steps must be an int >= 1"),
    (dict(name="sgd", learning_rate=0.1, frozen_params="head/.*"),
     r"frozen_params must be a list of regexes"),
    (dict(name="sgd", learning_rate=0.1, lr_mults=(("head/(", 2.0),)),
     r"lr_mults: invalid regex 'head/\('"),
])
def test_bad_config_raises_naming_the_field(config, message):
  with pytest.raises(ValueError, match=message):
    optimizers.create_optimizer(config, total_steps=10)


def test_regex_that_matches_nothing_is_an_error():
  for field, value in (("frozen_params", ("heads/.*",)),
                       ("lr_mults", (("heads/.*", 0.1),))):
    optimizer = optimizers.create_optimizer(
        {"name": "sgd", "learning_rate": 0.1, field: value})
    with pytest.raises(ValueError,
                       match=f"{field}: regex 'heads/.*' matches no"):
      optimizer.tx.init(_params())


# ------------------------------------------------------------------ updates

def test_plain_sgd_update_is_minus_lr_times_grad():
  updates = _one_update(dict(name="sgd", learning_rate=0.1))
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -0.1 * g, rtol=1e-6),
               updates, _grads())


def test_frozen_params_get_exactly_zero_update_and_no_state():
  config = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=0.1,
      frozen_params=("head/.*", ".*/LayerNorm_0/.*"),
      schedule=dict(name="constant")))
  tx = optimizers.create_optimizer(config).tx
  params = _params()
  state, update = jax.jit(tx.init)(params), jax.jit(tx.update)
  for step in range(3):
    updates, state = update(_grads(seed=step), state, params)
    params = optax.apply_updates(params, updates)
    for name in ("head/kernel", "head/bias",
                 "Transformer/encoderblock_0/LayerNorm_0/scale"):
      assert np.all(_leaf(updates, name) == 0.0), name
      np.testing.assert_array_equal(_leaf(params, name), _leaf(_params(), name))
    assert np.all(_leaf(
        updates, "Transformer/encoderblock_0/MlpBlock/Dense_0/kernel") != 0)
  # Adam keeps mu and nu for the 3 trainable leaves only, plus the counters.
  moments = [x for x in jax.tree.leaves(state) if x.ndim > 0]
  assert len(moments) == 2 * 3


def test_lr_mults_scale_updates_first_matching_rule_wins():
  config = dict(name="sgd", learning_rate=0.1,
                lr_mults=(("head/.*", 0.5), (".*/bias", 2.0)))
  updates, grads = _one_update(config), _grads()
  expected_mult = {
      "head/kernel": 0.5, "head/bias": 0.5,
      "Transformer/encoderblock_0/MlpBlock/Dense_0/bias": 2.0,
      "Transformer/encoderblock_0/MlpBlock/Dense_0/kernel": 1.0,
      "Transformer/encoderblock_0/LayerNorm_0/scale": 1.0,
      "Transformer/posembed_input/pos_embedding": 1.0,
  }
  for name, mult in expected_mult.items():
    np.testing.assert_allclose(_leaf(updates, name),
                               -0.1 * mult * _leaf(grads, name), rtol=1e-6)


def test_lr_mults_with_momentum_equal_per_param_learning_rates():
  grads_seq = [_grads(seed) for seed in range(3)]

  def run(config):
    tx = optimizers.create_optimizer(config).tx
    params, update = _params(), jax.jit(tx.update)
    state = jax.jit(tx.init)(params)
    for grads in grads_seq:
      updates, state = update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params

  mixed = run(dict(name="sgd", learning_rate=0.1, momentum=0.9,
                   lr_mults=(("head/.*", 0.1),)))
  slow = run(dict(name="sgd", learning_rate=0.01, momentum=0.9))
  fast = run(dict(name="sgd", learning_rate=0.1, momentum=0.9))
  np.testing.assert_allclose(_leaf(mixed, "head/kernel"),
                             _leaf(slow, "head/kernel"), rtol=1e-6)
  pos_embedding = "Transformer/posembed_input/pos_embedding"
  np.testing.assert_array_equal(_leaf(mixed, pos_embedding),
                                _leaf(fast, pos_embedding))


def _zero_grads():
  return jax.tree.map(np.zeros_like, _params())


def _global_norm(tree):
  squares = sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))
  return float(np.sqrt(squares))


def test_weight_decay_mask_default_decays_kernels_only():
  config = dict(name="sgd", learning_rate=1.0, weight_decay=0.1,
                weight_decay_exclude=("head/.*",))
  updates, params = _one_update(config, grads=_zero_grads()), _params()
  decayed = ["Transformer/encoderblock_0/MlpBlock/Dense_0/kernel"]
  not_decayed = ["head/kernel", "head/bias",
                 "Transformer/encoderblock_0/MlpBlock/Dense_0/bias",
                 "Transformer/encoderblock_0/LayerNorm_0/scale",
                 "Transformer/posembed_input/pos_embedding"]
  for name in decayed:
    np.testing.assert_allclose(_leaf(updates, name), -0.1 * _leaf(params, name),
                               rtol=1e-6)
  for name in not_decayed:
    assert np.all(_leaf(updates, name) == 0.0), name


def test_weight_decay_is_decoupled_for_adamw_and_l2_for_adam():
  kernel = "Transformer/encoderblock_0/MlpBlock/Dense_0/kernel"
  params = _params()
  adamw = _one_update(dict(name="adamw", learning_rate=0.01, weight_decay=0.1),
                      grads=_zero_grads())
  np.testing.assert_allclose(_leaf(adamw, kernel),
                             -0.01 * 0.1 * _leaf(params, kernel), rtol=1e-6)
  # Coupled L2: the decay enters Adam's normalisation, whose first step is
  # g / |g| = sign(p).
  adam = _one_update(dict(name="adam", learning_rate=0.01, weight_decay=0.1),
                     grads=_zero_grads())
  np.testing.assert_allclose(_leaf(adam, kernel),
                             -0.01 * np.sign(_leaf(params, kernel)), rtol=1e-4)


def test_grad_clip_norm_caps_the_global_norm():
  config = dict(name="sgd", learning_rate=1.0, grad_clip_norm=1.0)
  big = jax.tree.map(lambda g: 10.0 * g, _grads())
  assert _global_norm(big) > 1.0
  updates = _one_update(config, grads=big)
  np.testing.assert_allclose(_global_norm(updates), 1.0, rtol=1e-5)
  scale = _global_norm(big)
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -g / scale,
                                                       rtol=1e-5), updates, big)
  small = jax.tree.map(lambda g: 1e-3 * g, _grads())
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, -g, rtol=1e-6),
               _one_update(config, grads=small), small)


def test_gradient_accumulation_equals_the_big_batch_step():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(8, 3)).astype(np.float32)
  y = rng.normal(size=(8, 2)).astype(np.float32)
  params = {"dense": {"kernel": rng.normal(size=(3, 2)).astype(np.float32),
                      "bias": np.zeros(2, np.float32)}}

  def loss(p, xb, yb):
    return jnp.mean((xb @ p["dense"]["kernel"] + p["dense"]["bias"] - yb) ** 2)

  def config(steps):
    return dict(name="adamw", learning_rate=0.1, weight_decay=0.1,
                grad_clip_norm=0.5, accumulation_steps=steps)

  def train(accumulation_steps):
    tx = optimizers.create_optimizer(config(accumulation_steps)).tx

    @jax.jit
    def step(p, state, xb, yb):
      updates, state = tx.update(jax.grad(loss)(p, xb, yb), state, p)
      return optax.apply_updates(p, updates), state, updates

    p, state, size = params, jax.jit(tx.init)(params), 8 // accumulation_steps
    all_updates = []
    for i in range(accumulation_steps):
      p, state, updates = step(p, state, x[i * size:(i + 1) * size],
                               y[i * size:(i + 1) * size])
      all_updates.append(updates)
    return p, all_updates

  expected, _ = train(1)
  accumulated, updates = train(4)
  for micro_step_updates in updates[:3]:
    assert all(np.all(u == 0) for u in jax.tree.leaves(micro_step_updates))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               accumulated, expected)
