"""Preprocessing strings and ops against numpy references."""
import numpy as np
import pytest
import tensorflow as tf

from moe.data import preprocess
from moe.data import preprocess_ops  # noqa: F401  (registers the ops)


def _run(pp, seed=0, **features):
  data = {k: tf.constant(v) for k, v in features.items()}
  rng = preprocess.example_seed(seed, 0)
  result = preprocess.apply_seeded(preprocess.get_preprocess_fn(pp), data,
                                   rng)
  return {k: v.numpy() for k, v in result.items()}


def _image(h=6, w=5, c=3):
  return (np.arange(h * w * c).reshape(h, w, c) * 3 % 256).astype(np.uint8)


def test_value_range_matches_numpy():
  image = _image()
  values = image.astype(np.float64)
  out = _run("value_range(-1, 1)", image=image)["image"]
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, values / 255 * 2 - 1, atol=1e-6)
  out = _run("value_range(0, 1, 10, 20, clip_values=True)", image=image)
  np.testing.assert_allclose(out["image"], np.clip((values - 10) / 10, 0, 1),
                             atol=1e-6)


def test_onehot_matches_numpy():
  labels = np.array([3, 0, 9])
  out = _run("onehot(10, key_result='labels')", label=labels)
  np.testing.assert_array_equal(out["labels"], np.eye(10)[labels])
  np.testing.assert_array_equal(out["label"], labels)
  out = _run("onehot(4, on=0.9, off=0.1)", label=np.array(2))
  np.testing.assert_allclose(out["label"], [0.1, 0.1, 0.9, 0.1])


@pytest.mark.parametrize("size,shape", [(4, (4, 4, 3)), ((3, 7), (3, 7, 3))])
def test_resize_shape_and_dtype(size, shape):
  out = _run(f"resize({size})", image=_image())["image"]
  assert out.shape == shape and out.dtype == np.uint8


def test_resize_of_constant_image_is_constant():
  image = np.full((5, 5, 1), 77, np.uint8)
  np.testing.assert_array_equal(_run("resize(9)", image=image)["image"], 77)


def test_central_crop_matches_numpy():
  image = _image(7, 8)
  out = _run("central_crop((3, 4))", image=image)["image"]
  np.testing.assert_array_equal(out, image[2:5, 2:6])


def test_flip_lr_flips_or_keeps_and_is_seeded():
  image = _image()
  outcomes = set()
  for seed in range(16):
    out = _run("flip_lr", seed=seed, image=image)["image"]
    np.testing.assert_array_equal(out, _run("flip_lr", seed=seed,
                                            image=image)["image"])
    flipped = np.array_equal(out, image[:, ::-1])
    assert flipped or np.array_equal(out, image)
    outcomes.add(flipped)
  assert outcomes == {True, False}


def test_random_crop_is_a_window_of_the_image():
  image = _image(8, 8, 1)
  out = _run("random_crop(5)", seed=3, image=image)["image"]
  assert out.shape == (5, 5, 1)
  windows = [image[i:i + 5, j:j + 5] for i in range(4) for j in range(4)]
  assert any(np.array_equal(out, w) for w in windows)


def test_inception_crop_and_jpeg_variant_shapes():
  image = np.random.RandomState(0).randint(0, 255, (40, 30, 3), np.uint8)
  out = _run("inception_crop(16)", image=image)["image"]
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  jpeg = tf.io.encode_jpeg(image).numpy()
  out = _run("decode_jpeg_and_inception_crop((12, 10))", image=jpeg)
  assert out["image"].shape == (12, 10, 3)


def test_decode_png_and_no_op_on_decoded():
  image = _image(4, 4, 1)
  png = tf.io.encode_png(image).numpy()
  np.testing.assert_array_equal(_run("decode", image=png)["image"], image)
  assert _run("decode(channels=3)", image=png)["image"].shape == (4, 4, 3)
  np.testing.assert_array_equal(_run("decode", image=image)["image"], image)


def test_grayscale_to_rgb_and_keep():
  image = _image(2, 2, 1)
  out = _run("grayscale_to_rgb|keep('image')", image=image, label=1)
  assert set(out) == {"image"}
  np.testing.assert_array_equal(out["image"], np.repeat(image, 3, axis=-1))


def test_chained_string_with_spaces():
  out = _run(" decode | resize(4) |value_range(-1, 1)| onehot(10) ",
             image=tf.io.encode_png(_image(8, 8, 1)).numpy(), label=5)
  assert out["image"].shape == (4, 4, 1) and out["label"].shape == (10,)


def test_unknown_op_names_it_and_lists_registered():
  with pytest.raises(ValueError, match=r"Unknown preprocessing op 'no_such"
                     r"_op'.*Registered ops: .*value_range"):
    preprocess.get_preprocess_fn("decode|no_such_op(3)")


@pytest.mark.parametrize("pp", ["resize(", "value_range(lo, 1)",
                                "resize(32, size=3)", "a.b"])
def test_malformed_ops_are_value_errors(pp):
  with pytest.raises(ValueError, match="preprocessing op"):
    preprocess.get_preprocess_fn(pp)


def test_register_new_op_and_reject_duplicate():

  @preprocess.register("test_add_constant")
  def add_constant(value, key="x"):
    return lambda data: {**data, key: data[key] + value}

  assert "test_add_constant" in preprocess.registered_ops()
  assert _run("test_add_constant(2)|test_add_constant(3)", x=1)["x"] == 6
  with pytest.raises(ValueError, match="already registered"):
    preprocess.register("test_add_constant")(add_constant)


def test_random_op_outside_pipeline_is_a_clear_error():
  with pytest.raises(KeyError, match="need a seed"):
    preprocess.get_preprocess_fn("flip_lr")({"image": tf.constant(_image())})
