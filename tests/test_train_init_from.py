"""Tests of moe.checkpoints.init_from: fine-tuning from checkpoints, upcycling."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from moe.nn import models
from moe.config import recipes
from moe.checkpoints import init_from
from moe.config import param_names
from moe.train import trainer
import train_testing

DENSE_MLP = "Transformer/encoderblock_1/MlpBlock_3"
EXPERTS = "Transformer/encoderblock_1/MoeBlock_3/Experts"
ROUTER = "Transformer/encoderblock_1/MoeBlock_3/Router/dense/kernel"


def _param_shapes(model_config, image_size):
  """The model's parameters as `jax.ShapeDtypeStruct`s (no computation)."""
  model = models.build_model(model_config)
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 1), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), images)["params"]


def _write_public_vit_npz(path, prefix=""):
  """A 2-block dense ViT (8x8 images, 2x2 patches, 10 classes, pre-logits)
  with random values, saved as a `.npz` of '/'-joined names: the public ViT
  layout."""
  rng = np.random.default_rng(0)
  config = recipes.vit_model("tiny/2", 10, representation_size=32)
  arrays = {prefix + name: rng.normal(size=leaf.shape).astype(np.float32)
            for name, leaf in param_names.named_leaves(
                _param_shapes(config, 8))}
  np.savez(path, **arrays)
  return {name[len(prefix):]: value for name, value in arrays.items()}


def _bilinear_reference(grid, side):
  """The reference loaders' resize of a [g, g, D] grid (scipy, order 1)."""
  zoom = side / grid.shape[0]
  return ndimage.zoom(grid, (zoom, zoom, 1), order=1)


@pytest.mark.parametrize("prefix", ["", "params/"])
def test_vmoe_from_public_vit_npz(tmp_path, caplog, prefix):
  npz = _write_public_vit_npz(tmp_path / "vit.npz", prefix)
  # A V-MoE (block 1: E=4 experts) at 12x12 px (6x6 patches), 5 classes.
  moe = recipes.moe_config(4, 2, layers="every_2")
  fresh = _param_shapes(recipes.vit_model("tiny/2", 5, moe=moe), 12)
  init_fn = init_from.create_init_params_fn(
      dict(checkpoint=str(tmp_path / "vit.npz"), reinit=(".*/Router/.*",),
           allow_unused=("pre_logits/.*",)))
  with caplog.at_level(logging.INFO):
    params = dict(param_names.named_leaves(init_fn(fresh)))
  fresh = dict(param_names.named_leaves(fresh))

  for layer in ("Dense_0", "Dense_1"):
    for kind in ("kernel", "bias"):
      experts = params[f"{EXPERTS}/{layer}/{kind}"]
      assert experts.shape[0] == 4
      for expert in experts:
        np.testing.assert_array_equal(expert,
                                      npz[f"{DENSE_MLP}/{layer}/{kind}"])
  block0 = "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"
  np.testing.assert_array_equal(params[block0], npz[block0])
  assert params[ROUTER] is fresh[ROUTER]  # left to the fresh initialisation

  posemb = params[init_from.POSEMB]
  source = npz[init_from.POSEMB]
  assert posemb.shape == (1, 37, 32) and source.shape == (1, 17, 32)
  np.testing.assert_array_equal(posemb[:, 0], source[:, 0])
  reference = _bilinear_reference(source[0, 1:].reshape(4, 4, 32), 6)
  np.testing.assert_allclose(posemb[0, 1:].reshape(6, 6, 32), reference,
                             rtol=1e-5, atol=1e-6)

  assert params["head/kernel"].shape == (32, 5)
  np.testing.assert_array_equal(params["head/kernel"], 0)
  np.testing.assert_array_equal(params["head/bias"], 0)

  log = caplog.text
  fresh_part, unused_part = log.split("fresh (config.init_from.reinit)")[
      1].split("unused checkpoint parameters (config.init_from.allow_unused)")
  assert ROUTER in fresh_part
  assert "pre_logits/kernel" in unused_part and "pre_logits/bias" in unused_part
  for line in (
      f"{EXPERTS}/Dense_0/kernel (4, 32, 64) <- {DENSE_MLP}/Dense_0/kernel "
      "(32, 64) (upcycle)",
      f"{init_from.POSEMB} (1, 37, 32) <- {init_from.POSEMB} (1, 17, 32) "
      "(resize_posemb)",
      "head/kernel (32, 5) <- head/kernel (32, 10) (new_head)"):
    assert line in log


@pytest.mark.parametrize("model_shapes, checkpoint, rules, message", [
    ({"embedding/kernel": (2, 2, 1, 32)},
     {"embedding/kernel": np.zeros((2, 2, 3, 32))}, init_from.DEFAULT_RULES,
     r"checkpoint parameter 'embedding/kernel' has shape \(2, 2, 3, 32\) but "
     r"model parameter 'embedding/kernel' has shape \(2, 2, 1, 32\)"),
    ({f"{EXPERTS}/Dense_0/kernel": (4, 32, 64)},
     {f"{DENSE_MLP}/Dense_0/kernel": np.zeros((32, 128))},
     init_from.DEFAULT_RULES,
     rf"'{DENSE_MLP}/Dense_0/kernel' has shape \(32, 128\) but model "
     rf"parameter '{EXPERTS}/Dense_0/kernel' has shape \(4, 32, 64\); the "
     r"rule .* transform 'upcycle' cannot map"),
    ({init_from.POSEMB: (1, 25, 32)},
     {init_from.POSEMB: np.zeros((1, 24, 32))}, init_from.DEFAULT_RULES,
     r"Transformer/posembed_input/pos_embedding' has shape \(1, 24, 32\)"),
    ({"head/kernel": (32, 5)}, {"head/kernel": np.zeros((16, 5))},
     init_from.DEFAULT_RULES, r"'head/kernel' has shape \(16, 5\)"),
    ({"head/kernel": (32, 5)}, {"head/kernel": np.zeros((32, 5))},
     ((r"head/(.*)", r"head/\1", "resize"),),
     r"config.init_from.rules: the transform of 'head/\(\.\*\)' must be None "
     r"or one of 'upcycle', 'resize_posemb', 'resize_posemb_half_pixel', "
     r"'new_head'; got 'resize'"),
])
def test_unexplained_shape_mismatch_raises_naming_the_parameter(
    model_shapes, checkpoint, rules, message):
  with pytest.raises(ValueError, match=message):
    config = init_from.InitFromConfig(checkpoint="ckpt", rules=rules)
    init_from.map_checkpoint(model_shapes, checkpoint, config)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, digits_data_dir):
  """The runlocal digits ViT after 3 train steps: (workdir, TrainResult)."""
  workdir = str(tmp_path_factory.mktemp("dense"))
  config = train_testing.load_config(
      "digits_vit.py:runlocal", f"--config.dataset.data_dir={digits_data_dir}",
      "--config.total_steps=3")
  return workdir, trainer.train_and_evaluate(config, workdir)


@pytest.mark.slow
def test_init_from_own_checkpoint_is_bitwise(dense_run, digits_data_dir,
                                             tmp_path, eight_devices):
  # Another optimizer than the source run's adam, with learning rate 0: the
  # parameters after one step are the initial ones.
  workdir, source = dense_run
  config = train_testing.load_config(
      "digits_vit.py:runlocal", f"--config.dataset.data_dir={digits_data_dir}",
      f"--config.init_from.checkpoint={workdir}/checkpoints/3",
      "--config.total_steps=1", "--config.optimizer.name=sgd",
      "--config.optimizer.momentum=0.9", "--config.optimizer.learning_rate=0",
      "--config.optimizer.schedule.warmup_steps=0")
  result = trainer.train_and_evaluate(config, str(tmp_path))
  train_testing.assert_trees_equal(result.state.params, source.state.params)


@pytest.mark.slow
def test_digits_ft_config_runs_end_to_end(dense_run, digits_data_dir,
                                          tmp_path, caplog, eight_devices):
  workdir, _ = dense_run
  config = train_testing.load_config(
      "digits_ft_vmoe.py:runlocal",
      f"--config.dataset.data_dir={digits_data_dir}",
      f"--config.init_from.checkpoint={workdir}", "--config.total_steps=3",
      "--config.mesh.expert=4")
  with caplog.at_level(logging.INFO):
    result = trainer.train_and_evaluate(config, str(tmp_path))
  assert result.step == 3 and np.isfinite(result.eval_metrics["eval_loss"])
  assert (f"{EXPERTS}/Dense_1/bias (8, 32) <- {DENSE_MLP}/Dense_1/bias (32,) "
          "(upcycle)") in caplog.text
  experts = result.state.params["Transformer"]["encoderblock_1"][
      "MoeBlock_3"]["Experts"]["Dense_0"]["kernel"]
  assert experts.sharding.spec[0] == "expert"


def test_init_params_fn_and_init_from_checkpoint_together_is_an_error(
    tmp_path):
  config = train_testing.load_config(
      "digits_vit.py:runlocal", "--config.init_from.checkpoint=/tmp/run")
  with pytest.raises(ValueError, match=r"pass init_params_fn or set "
                     r"config.init_from.checkpoint, not both"):
    trainer.train_and_evaluate(config, str(tmp_path),
                               init_params_fn=lambda params: params)


def _bad_npz_files(directory):
  """name -> (path, expected error) for files that are not usable .npz."""
  good = directory / "good.npz"
  np.savez(good, **{"head/bias": np.zeros(3, np.float32),
                    "head/kernel": np.ones((2, 3), np.float32)})
  data = good.read_bytes()
  truncated = directory / "truncated.npz"
  truncated.write_bytes(data[:len(data) // 2])
  npy = directory / "array.npz"
  with open(npy, "wb") as f:
    np.save(f, np.zeros((2, 3)))
  text = directory / "notes.npz"
  text.write_text("not an archive")
  empty = directory / "empty.npz"
  np.savez(empty)
  return {
      "truncated": (truncated, r"truncated\.npz is not a readable \.npz "
                               r"archive \(truncated or corrupt\?\)"),
      "npy": (npy, r"array\.npz is not an \.npz archive: numpy reads it as "
                   r"one array of shape \(2, 3\)"),
      "text": (text, r"notes\.npz is not a readable \.npz archive"),
      "empty": (empty, r"empty\.npz holds no arrays"),
  }


@pytest.mark.parametrize("kind", ["truncated", "npy", "text", "empty"])
def test_bad_npz_files_raise_naming_the_path(tmp_path, kind):
  path, message = _bad_npz_files(tmp_path)[kind]
  with pytest.raises(init_from.manager.CheckpointError, match=message):
    init_from.load_checkpoint(str(path))


def test_npz_suffix_is_case_insensitive(tmp_path):
  path = tmp_path / "VIT.NPZ"
  np.savez(tmp_path / "vit.npz", **{"params/head/bias": np.arange(3.),
                                    "params/embedding/bias": np.ones(2)})
  (tmp_path / "vit.npz").rename(path)
  loaded = init_from.load_checkpoint(str(path))
  assert sorted(loaded) == ["embedding/bias", "head/bias"]
  np.testing.assert_array_equal(loaded["head/bias"], np.arange(3.))
