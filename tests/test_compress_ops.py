"""moe.compress: quantization, pruning, distillation, phases, student file,
each against an independent numpy version."""
import flax.linen as nn
from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from moe import ops
from moe.compress import distillation
from moe.compress import phases
from moe.compress import pruning
from moe.compress import quantization
from moe.compress import student_file


def _np_codes(x, bits, reduce_axes):
  """Symmetric quantization written from its definition: (codes, scale)."""
  qmax = 2 ** (bits - 1) - 1
  absmax = np.max(np.abs(x), axis=reduce_axes, keepdims=True)
  scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
  return np.clip(np.round(x / scale), -qmax, qmax), scale


def _np_quantize(x, bits, reduce_axes):
  codes, scale = _np_codes(x, bits, reduce_axes)
  return codes * scale


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("shape", [(7,), (5, 6), (3, 4, 5)])
def test_fake_quantization_matches_numpy(bits, shape):
  x = np.random.default_rng(bits).standard_normal(shape).astype(np.float32)
  # XLA divides by the constant qmax as a product with its reciprocal, so
  # the scales may differ from numpy's by an ulp; the codes may not.
  np_codes, np_scale = _np_codes(x, bits, tuple(range(len(shape) - 1)))
  codes, scales = quantization.quantize_kernel(jnp.asarray(x), bits)
  assert codes.dtype == jnp.int8 and scales.shape == shape[-1:]
  np.testing.assert_array_equal(codes, np_codes)
  np.testing.assert_allclose(scales, np_scale.reshape(-1), rtol=1e-6)
  assert np.abs(np.asarray(codes)).max() == 2 ** (bits - 1) - 1
  # The codes are what the forward pass trains with, exactly.
  np.testing.assert_array_equal(
      np.asarray(codes, np.float32) * np.asarray(scales),
      quantization.fake_quantize_kernel(jnp.asarray(x), bits))
  row_codes, row_scale = _np_codes(x, bits, (len(shape) - 1,))
  np.testing.assert_allclose(
      quantization.fake_quantize_rows(jnp.asarray(x), bits),
      row_codes * row_scale, rtol=1e-6)
  # Levels per channel: at most 2 qmax + 1.
  assert len(np.unique(np.asarray(codes)[..., 0])) <= 2 ** bits - 1


def test_fake_quantization_has_the_straight_through_gradient():
  x = jnp.linspace(-1.0, 2.0, 12).reshape(3, 4)
  weights = jnp.arange(12.0).reshape(3, 4)
  for fn in (quantization.fake_quantize_kernel,
             quantization.fake_quantize_rows):
    grad = jax.grad(lambda v, fn=fn: jnp.sum(fn(v, 4) * weights))(x)
    np.testing.assert_array_equal(grad, weights)
  assert quantization.fake_quantize_kernel(x, 32) is x
  zeros = jnp.zeros((3, 2))
  np.testing.assert_array_equal(quantization.fake_quantize_kernel(zeros, 4),
                                zeros)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 64, True, "8"])
def test_bad_bits_name_the_field(bits):
  with pytest.raises(ValueError, match=r"config.task.weight_bits must be an "
                     r"integer in 2..8, or 32"):
    quantization.check_bits(bits, "config.task.weight_bits")


def test_layer_inputs_are_quantized_like_numpy():
  model = nn.Dense(3)
  x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
  params = model.init(jax.random.key(0), x)
  with quantization.quantized_layer_inputs(8):
    out = model.apply(params, x)
  kernel = np.asarray(params["params"]["kernel"])
  expected = _np_quantize(x, 8, (1,)) @ kernel + params["params"]["bias"]
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  with quantization.quantized_layer_inputs(8, enabled=False):
    np.testing.assert_array_equal(model.apply(params, x),
                                  jnp.asarray(x) @ kernel
                                  + params["params"]["bias"])


def test_cubic_schedule():
  values = [pruning.cubic_sparsity(r, 4, 0.0, 0.9) for r in range(5)]
  assert values[0] == 0 and values[-1] == pytest.approx(0.9)
  assert values == sorted(values)
  increments = np.diff(values)
  assert all(increments[:-1] > increments[1:])   # Fast first, slow last.
  assert values[1] == pytest.approx(0.9 * (1 - 0.75 ** 3))


@given(st.integers(1, 40), st.floats(0, 0.99), st.integers(0, 3))
@settings(max_examples=40, deadline=None)
def test_layer_masks_keep_exactly_k_of_the_largest(size, sparsity, seed):
  rng = np.random.default_rng(seed)
  # Few distinct values: ties must not change the count.
  w = rng.integers(-3, 4, size).astype(np.float32)
  old = (rng.random(size) < 0.8).astype(np.float32)
  k = min(pruning.keep_count(size, sparsity), int(old.sum()))
  new = np.asarray(pruning.magnitude_masks(
      {"w": jnp.asarray(w)}, {"w": jnp.asarray(old)}, {"w": k}, "layer")["w"])
  assert new.sum() == k
  assert np.all(new <= old)    # Pruned weights stay pruned.
  if 0 < k < old.sum():
    kept = np.abs(w)[new > 0]
    dropped = np.abs(w)[(old > 0) & (new == 0)]
    assert kept.min() >= dropped.max()


def test_global_masks_rank_all_layers_together():
  weights = {"a": jnp.asarray([5.0, 1.0, 0.5, 4.0]),
             "b": jnp.asarray([[3.0, 0.1], [2.0, 6.0]])}
  ones = {name: jnp.ones_like(w) for name, w in weights.items()}
  masks = pruning.magnitude_masks(weights, ones, 4, "global")
  np.testing.assert_array_equal(masks["a"], [1, 0, 0, 1])
  np.testing.assert_array_equal(masks["b"], [[1, 0], [0, 1]])
  sizes = {"a": 4, "b": 4}
  assert pruning.keep_counts(sizes, 0.5, "global") == 4
  assert pruning.keep_counts(sizes, 0.75, "layer") == {"a": 1, "b": 1}


def test_soft_pruning_is_exactly_sparse_and_differentiable():
  w = jnp.asarray([3.0, -2.5, 0.3, 1.0, -0.2, 2.0, 0.05, -1.5])
  mask = jnp.asarray([1, 1, 1, 1, 1, 1, 0, 1], jnp.float32)
  out = pruning.soft_pruned({"w": w}, {"w": mask}, {"w": 3}, "layer",
                            regularization=0.3, p=4 / 3)["w"]
  assert out[6] == 0 and out[4] == 0 and out[2] == 0   # Masked, small.
  assert 3 <= int(jnp.sum(out != 0)) < 7
  assert out[0] > 0 and out[1] < 0
  # The gradient is the soft top-k's at a fixed scale σ (no gradient
  # through σ, the RMS of the kept weights), and 0 outside the mask.
  sigma = float(jnp.sqrt(jnp.sum((w * mask) ** 2) / jnp.sum(mask)))
  cotangent = jnp.arange(1.0, 9.0)

  def fixed_scale(v):
    return sigma * ops.topk_magnitude(v * mask / sigma, 3,
                                      regularization=0.3, p=4 / 3)

  grad = jax.grad(lambda v: jnp.sum(cotangent * pruning.soft_pruned(
      {"w": v}, {"w": mask}, {"w": 3}, "layer", regularization=0.3,
      p=4 / 3)["w"]))(w)
  np.testing.assert_allclose(
      grad, jax.grad(lambda v: jnp.sum(cotangent * fixed_scale(v)))(w),
      rtol=1e-5, atol=1e-6)
  assert grad[6] == 0 and jnp.any(grad != 0)
  check_grads(fixed_scale, (w,), order=1, modes=("rev",), atol=1e-2,
              rtol=1e-2)


@pytest.mark.parametrize("value", [1.0, 1.5, -0.1, "0.5", True])
def test_bad_sparsity_names_the_field(value):
  with pytest.raises(ValueError, match=r"config.task.sparsity must be a "
                     r"number in \[0, 1\)"):
    pruning.check_sparsity(value, "config.task.sparsity")


def test_a_pattern_matching_no_parameter_is_an_error():
  names = ("Dense_0/kernel", "Dense_0/bias", "head/kernel")
  assert pruning.select_params(names, [r"Dense_\d/kernel"], "f") == (
      "Dense_0/kernel",)
  with pytest.raises(ValueError, match="config.task.prune_params"):
    pruning.select_params(names, ["encoder/.*"], "config.task.prune_params")


def test_kd_loss_matches_numpy_and_fixes_the_target():
  rng = np.random.default_rng(0)
  s, t = (rng.standard_normal((4, 5)).astype(np.float32) for _ in range(2))
  temperature = 3.0

  def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  p, q = softmax(t / temperature), softmax(s / temperature)
  expected = temperature ** 2 * np.sum(p * np.log(p / q), -1)
  np.testing.assert_allclose(distillation.kd_loss(s, t, temperature),
                             expected, rtol=1e-5)
  np.testing.assert_allclose(distillation.kd_loss(s, s, temperature), 0,
                             atol=1e-6)
  grad_target = jax.grad(lambda t_: jnp.sum(distillation.kd_loss(
      s, t_, temperature)))(t)
  np.testing.assert_array_equal(grad_target, 0)
  student_kd, teacher_kd = distillation.mutual_kd_losses(s, t, temperature)
  np.testing.assert_allclose(student_kd, expected, rtol=1e-5)
  np.testing.assert_allclose(teacher_kd, distillation.kd_loss(t, s, 3.0))


def _schedule(method="hard", **overrides):
  fields = dict(total_steps=20, dense_steps=6, prune_steps=6, warmup_steps=2,
                pruning_rounds=2, initial_sparsity=0.0, sparsity=0.9,
                method=method)
  return phases.PhaseSchedule(**{**fields, **overrides})


def test_phases_rounds_and_mask_events():
  schedule = _schedule()
  assert schedule.boundaries == (6, 12, 14)
  assert [int(schedule.phase(s)) for s in (0, 5, 6, 11, 12, 13, 14, 19)] == [
      0, 0, 1, 1, 2, 2, 3, 3]
  assert schedule.round_starts == (6, 9)
  s1 = pruning.cubic_sparsity(1, 2, 0.0, 0.9)
  assert schedule.mask_events == ((6, s1), (9, pytest.approx(0.9)),
                                  (12, pytest.approx(0.9)))
  # Soft: the mask is one round behind the soft operator's target.
  assert _schedule("soft").mask_events == ((6, 0.0), (9, s1),
                                           (12, pytest.approx(0.9)))
  np.testing.assert_allclose(
      [schedule.target_sparsity(s) for s in (0, 6, 9, 15)],
      [0, s1, 0.9, 0.9], rtol=1e-6)


@pytest.mark.parametrize("overrides, message", [
    (dict(warmup_steps=9), r"do not fit config.total_steps=20: dense_steps "
     r"\+ prune_steps \+ warmup_steps = 6 \+ 6 \+ 9 = 21"),
    (dict(pruning_rounds=7), r"pruning_rounds must be in 1..prune_steps"),
    (dict(pruning_rounds=0), r"pruning_rounds must be in 1..prune_steps"),
    (dict(prune_steps=0), r"prune_steps is 0, so nothing is pruned"),
    (dict(dense_steps=-1), r"config.task.dense_steps must be an integer"),
    (dict(initial_sparsity=0.95), r"initial_sparsity \(0.95\) must be <="),
    (dict(sparsity=1.0), r"config.task.sparsity must be a number in"),
])
def test_bad_phase_schedules_name_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    _schedule(**overrides)


@given(st.integers(2, 8), st.integers(1, 50), st.integers(0, 2 ** 16))
@settings(max_examples=30, deadline=None)
def test_bit_packing_round_trips(bits, count, seed):
  values = np.random.default_rng(seed).integers(0, 2 ** bits, count)
  packed = student_file.pack_bits(values, bits)
  assert packed.nbytes == -(-count * bits // 8)
  np.testing.assert_array_equal(
      student_file.unpack_bits(packed, bits, count), values)


@pytest.mark.parametrize("bits", [4, 32])
def test_student_file_round_trips_the_quantized_weights(tmp_path, bits):
  rng = np.random.default_rng(bits)
  kernel = rng.standard_normal((20, 6)).astype(np.float32)
  kernel[rng.random((20, 6)) < 0.8] = 0
  bias = rng.standard_normal(6).astype(np.float32)
  path = tmp_path / "student.npz"
  size = student_file.write_student(
      path, model_config={"name": "mlp", "num_classes": 6,
                          "hidden_sizes": []},
      kernels={"head/kernel": kernel}, other_params={"head/bias": bias},
      weight_bits=bits, activation_bits=8)
  assert size == path.stat().st_size
  student = student_file.read_student(path)
  expected = kernel if bits == 32 else np.asarray(
      quantization.fake_quantize_kernel(jnp.asarray(kernel), bits))
  np.testing.assert_array_equal(student.params["head"]["kernel"], expected)
  np.testing.assert_array_equal(student.params["head"]["bias"], bias)
  assert student.nonzeros["head/kernel"] == np.count_nonzero(expected)
  x = rng.standard_normal((3, 20)).astype(np.float32)
  np.testing.assert_allclose(
      student_file.predict(student, x),
      _np_quantize(x, 8, (1,)) @ expected + bias, rtol=1e-5, atol=1e-5)


def test_student_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no student file"):
    student_file.read_student(tmp_path / "missing.npz")
  np.savez(tmp_path / "other.npz", x=np.zeros(3))
  with pytest.raises(ValueError, match="is not a moe.pqk_student file"):
    student_file.read_student(tmp_path / "other.npz")
