"""Public ViT checkpoints in every layout load faithfully or fail loudly, and
our checkpoints export to them (moe.checkpoints.layouts, init_from,
moe.export).

Checkpoints are written here with the names of google-research/
vision_transformer and big_vision (`vit_reference`); the logits of our model
after `config.init_from` are compared with a float64 numpy forward pass of
the tree those codebases' own loaders would build from the same file.
"""
import ast
import logging
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe import export
from moe.checkpoints import init_from
from moe.checkpoints import layouts
from moe.checkpoints import manager
from moe.config import param_names
from moe.config import recipes
from moe.nn import models
import train_testing
import vit_reference as ref

CLASSES = 10
ATOL = 1e-5


def _images(size, seed=0):
  return np.random.default_rng(seed).normal(size=(3, size, size, 3)).astype(
      np.float32)


def _model_and_fresh(image_size, **fields):
  model = models.build_model(recipes.vit_model("tiny/2", CLASSES, **fields))
  images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return model, model.init(jax.random.key(0), images)["params"]


def _our_logits(path, image_size, fields, **init_fields):
  """Our model's logits after `init_from` from `path`, and the log text."""
  model, fresh = _model_and_fresh(image_size, **fields)
  init_fn = init_from.create_init_params_fn(dict(checkpoint=str(path),
                                                 **init_fields))
  params = init_fn(fresh)
  logits, _ = model.apply({"params": params}, _images(image_size), train=False)
  return np.asarray(logits)


def _vit_jax_logits(path, classifier, image_size, **kwargs):
  tree = ref.vit_jax_load(path, classifier=classifier, grid=image_size // 2)
  return ref.vit_forward(tree, _images(image_size), pool=classifier,
                         posemb_before_cls=False, **kwargs)


def _big_vision_logits(path, pool_type, image_size, **kwargs):
  tree = ref.big_vision_load(path, grid=image_size // 2)
  return ref.vit_forward(tree, _images(image_size), pool=pool_type,
                         posemb_before_cls=True, **kwargs)


def _train_checkpoint(tree):
  return {"params": tree, "opt": ref.optimizer_state_like(tree)}


def _flax_optim_checkpoint(tree):
  return {"opt": {"target": tree, "state": ref.optimizer_state_like(tree)}}


# name: (file tree, our model fields, layout, reference, pool, image size)
CASES = {
    "vit_jax released numbering": (
        lambda: ref.pre_linen(ref.vit_jax_tree()), {}, "vit_jax",
        _vit_jax_logits, "token", 8),
    "vit_jax released, pre-logits": (
        lambda: ref.pre_linen(ref.vit_jax_tree(rep_size=16)),
        {"representation_size": 16}, "vit_jax", _vit_jax_logits, "token", 8),
    "vit_jax current flax numbering": (
        ref.vit_jax_tree, {}, "vit_jax_linen", _vit_jax_logits, "token", 8),
    "vit_jax gap": (
        lambda: ref.vit_jax_tree(classifier="gap"), {"classifier": "gap"},
        "vit_jax_linen", _vit_jax_logits, "gap", 8),
    "big_vision tok": (
        ref.big_vision_tree, {}, "big_vision", _big_vision_logits, "tok", 8),
    "big_vision tok, params/ + opt/": (
        lambda: _train_checkpoint(ref.big_vision_tree()), {}, "big_vision",
        _big_vision_logits, "tok", 8),
    "big_vision tok, opt/target/": (
        lambda: _flax_optim_checkpoint(ref.big_vision_tree()), {},
        "big_vision", _big_vision_logits, "tok", 8),
    "big_vision gap": (
        lambda: ref.big_vision_tree(pool_type="gap"), {"classifier": "gap"},
        "big_vision", _big_vision_logits, "gap", 8),
    "big_vision map, pre-logits": (
        lambda: ref.big_vision_tree(pool_type="map", rep_size=16),
        {"classifier": "map", "representation_size": 16}, "big_vision",
        _big_vision_logits, "map", 8),
    "big_vision scan=True": (
        lambda: ref.stack_blocks(ref.big_vision_tree(pool_type="gap")),
        {"classifier": "gap"}, "big_vision", _big_vision_logits, "gap", 8),
    "vit_jax released, 8 -> 12 px": (
        lambda: ref.pre_linen(ref.vit_jax_tree()), {}, "vit_jax",
        _vit_jax_logits, "token", 12),
    "big_vision tok, 8 -> 12 px": (
        ref.big_vision_tree, {}, "big_vision", _big_vision_logits, "tok", 12),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_layout_loads_completely_with_the_reference_logits(
    case, tmp_path, caplog):
  make_tree, fields, layout, reference, pool, image_size = CASES[case]
  path = tmp_path / "vit.npz"
  ref.save_npz(path, make_tree())
  with caplog.at_level(logging.INFO):
    logits = _our_logits(path, image_size, fields)
  expected = reference(path, pool, image_size)
  assert np.abs(expected).max() > 0.5  # a forward pass that means something
  np.testing.assert_allclose(logits, expected, rtol=0, atol=ATOL)
  assert f"(layout {layout}" in caplog.text
  assert re.search(r"from the checkpoint \([0-9]+ transformed\), 0 fresh, 0 "
                   r"checkpoint parameters unused", caplog.text), caplog.text


def test_the_logit_check_tells_gelu_forms_and_resize_methods_apart(tmp_path):
  path = tmp_path / "vit.npz"
  ref.save_npz(path, ref.pre_linen(ref.vit_jax_tree()))
  logits = _our_logits(path, 12, {})
  erf = _vit_jax_logits(path, "token", 12, activation=ref.gelu_erf)
  assert np.abs(logits - erf).max() > 10 * ATOL
  half_pixel = _our_logits(
      path, 12, {}, rules=((init_from.POSEMB, init_from.POSEMB,
                            "resize_posemb_half_pixel"),)
      + init_from.VIT_RULES[1:])
  assert np.abs(half_pixel - _vit_jax_logits(path, "token", 12)).max() > (
      100 * ATOL)


@pytest.mark.parametrize("source, target", [(4, 6), (6, 4), (4, 7), (1, 3),
                                            (3, 1), (14, 24)])
def test_posemb_resize_equals_scipy_zoom_order_1(source, target):
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  grid = np.random.default_rng(0).normal(size=(source, source, 5)).astype(
      np.float32)
  expected = ndimage.zoom(grid, (target / source, target / source, 1), order=1)
  np.testing.assert_allclose(
      init_from.resize_grid_corner_aligned(grid, target), expected, atol=1e-6)


def test_posemb_class_slot_is_kept_dropped_or_added():
  rng = np.random.default_rng(0)
  with_slot = rng.normal(size=(1, 17, 4)).astype(np.float32)
  without = with_slot[:, 1:]
  np.testing.assert_array_equal(
      init_from.resize_posemb(with_slot, (1, 16, 4)), without)
  added = init_from.resize_posemb(without, (1, 17, 4))
  np.testing.assert_array_equal(added[:, 0], 0)
  np.testing.assert_array_equal(added[:, 1:], without)
  assert init_from.resize_posemb(with_slot, (1, 18, 4)) is None


def _write(tmp_path, tree, name="vit.npz"):
  path = tmp_path / name
  ref.save_npz(path, tree)
  return path


def _fix_from(message, flag):
  """The regexes the error message suggests for `--config.init_from.FLAG`,
  as the command line of `moe.main` parses them."""
  match = re.search(rf'--config\.init_from\.{flag}="([^"]*)"', message)
  assert match, message
  config = train_testing.load_config(
      "digits_vit.py:runlocal", f"--config.init_from.{flag}={match.group(1)}")
  assert tuple(config.init_from[flag]) == ast.literal_eval(match.group(1))
  return tuple(config.init_from[flag])


def test_fewer_layers_fail_with_the_fresh_block_and_the_fix(tmp_path):
  path = _write(tmp_path, ref.vit_jax_tree(depth=1))
  with pytest.raises(init_from.IncompleteInitError) as error:
    _our_logits(path, 8, {})
  message = str(error.value)
  first = message.splitlines()[0]
  assert "(layout vit_jax_linen) leaves 16 of the model's 40 parameters fresh"\
      " and 0 checkpoint parameters unused" in first
  assert "Transformer/encoderblock_1/LayerNorm_0/bias" in message
  assert _fix_from(message, "reinit") == ("Transformer/encoderblock_1/.*",)


def test_unused_pre_logits_fail_until_allowed(tmp_path, caplog):
  # An ImageNet-21k ViT: pre-logits as wide as the model.
  path = _write(tmp_path, ref.pre_linen(ref.vit_jax_tree(rep_size=32)))
  with pytest.raises(init_from.IncompleteInitError) as error:
    _our_logits(path, 8, {})
  message = str(error.value)
  assert "0 of the model's 40 parameters fresh and 2 checkpoint parameters "\
      "unused" in message
  assert "pre_logits/bias, pre_logits/kernel" in message
  allow = _fix_from(message, "allow_unused")
  assert allow == ("pre_logits/.*",)
  with caplog.at_level(logging.INFO):
    _our_logits(path, 8, {}, allow_unused=allow)
  assert "unused checkpoint parameters (config.init_from.allow_unused): 2" in (
      caplog.text)


def test_upcycling_needs_the_routers_in_reinit_and_the_fix_works(tmp_path):
  path = _write(tmp_path, ref.vit_jax_tree())
  moe = recipes.moe_config(4, 2, layers="every_2")
  with pytest.raises(init_from.IncompleteInitError) as error:
    _our_logits(path, 8, {"moe": moe})
  reinit = _fix_from(str(error.value), "reinit")
  assert reinit == ("Transformer/encoderblock_[0-9]+/MoeBlock_3/Router/.*",)
  _our_logits(path, 8, {"moe": moe}, reinit=reinit)


def test_layout_none_reads_names_as_they_are(tmp_path):
  path = _write(tmp_path, ref.vit_jax_tree())
  with pytest.raises(init_from.IncompleteInitError,
                     match=r"layout none \(names as they are\)"):
    _our_logits(path, 8, {}, layout="none")
  rules = ((r"(.*)/MultiHeadDotProductAttention_0/(.*)",
            r"\1/MultiHeadDotProductAttention_1/\2"),
           (r"(.*)/LayerNorm_1/(.*)", r"\1/LayerNorm_2/\2"),
           (r"(.*)/MlpBlock_0/(.*)", r"\1/MlpBlock_3/\2")) + init_from.VIT_RULES
  np.testing.assert_allclose(
      _our_logits(path, 8, {}, layout="none", rules=rules),
      _vit_jax_logits(path, "token", 8), atol=ATOL)


@pytest.mark.parametrize("arrays, message", [
    ({"w1": np.zeros((3, 4)), "b1": np.zeros(4)},
     r"bad\.npz: unknown layout: its 2 arrays \(e\.g\. b1, w1\) are not a ViT"),
    ({"embedding/kernel": np.zeros((2, 2, 3, 4)),
      "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/bias":
          np.zeros(4),
      "Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias": np.zeros(4)},
     r"bad\.npz: unknown layout: its encoder blocks mix the released "
     r"numbering \(MlpBlock_3\) and flax's per-type numbering "
     r"\(MultiHeadDotProductAttention_0\)"),
    ({"params/Transformer/encoderblock/LayerNorm_0/bias": np.zeros((2, 4)),
      "params/Transformer/encoderblock/LayerNorm_0/scale": np.zeros((3, 4))},
     r"stacked blocks .* must share one leading depth axis; their leading "
     r"sizes are \[2, 3\]"),
])
def test_unknown_layouts_raise_one_clear_error(tmp_path, arrays, message):
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  with pytest.raises(manager.CheckpointError, match=message):
    init_from.read_checkpoint(str(path))


def test_bfloat16_saved_as_void_is_recovered(tmp_path):
  value = np.arange(4, dtype=np.float32).astype(jnp.bfloat16)
  np.savez(tmp_path / "bf16.npz", **{"head/bias": value})
  loaded = init_from.load_npz(str(tmp_path / "bf16.npz"))["head/bias"]
  assert loaded.dtype == jnp.bfloat16
  np.testing.assert_array_equal(loaded.astype(np.float32), np.arange(4))


# --- export ----------------------------------------------------------------

def _random_params(fresh, seed=0):
  """Random values with the shapes of `fresh` (LayerNorm scales near 1)."""
  rng = np.random.default_rng(seed)
  return param_names.map_with_names(
      lambda name, leaf: (0.3 * rng.normal(size=leaf.shape)
                          + name.endswith("/scale")).astype(np.float32), fresh)


def _save_run(workdir, params, step=7):
  with manager.Checkpointer(workdir / manager.CHECKPOINT_SUBDIR) as ckpt:
    ckpt.save(step, {"params": jax.tree.map(jnp.asarray, params)},
              force=True)


EXPORT_CASES = {
    "vit_jax token": ({}, "vit_jax", _vit_jax_logits, "token"),
    "vit_jax_linen gap": ({"classifier": "gap"}, "vit_jax_linen",
                          _vit_jax_logits, "gap"),
    "big_vision token": ({}, "big_vision", _big_vision_logits, "tok"),
    "big_vision map": ({"classifier": "map", "representation_size": 16},
                       "big_vision", _big_vision_logits, "map"),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_is_read_by_the_reference_loader_with_equal_logits(
    case, tmp_path):
  fields, layout, reference, pool = EXPORT_CASES[case]
  model, fresh = _model_and_fresh(8, **fields)
  params = _random_params(fresh)
  _save_run(tmp_path / "run", params)
  out = tmp_path / "model.NPZ"
  export.export(tmp_path / "run", out, step=7, layout=layout)
  logits, _ = model.apply({"params": params}, _images(8), train=False)
  np.testing.assert_allclose(reference(out, pool, 8), logits, atol=ATOL)
  # And our loader reads it back to the same parameters.
  init_fn = init_from.create_init_params_fn(dict(checkpoint=str(out)))
  _assert_same_model(init_fn(fresh), params)


def _assert_same_model(restored, params):
  """Equal parameters, up to moving the class token's position embedding
  into `cls` (big_vision's model gives the class token none)."""
  restored, params = (dict(param_names.named_leaves(tree))
                      for tree in (restored, params))
  for tree in (restored, params):
    if "cls" in tree:
      posemb = np.asarray(tree[init_from.POSEMB])
      tree["cls"] = np.asarray(tree["cls"]) + posemb[:, :1]
      tree[init_from.POSEMB] = posemb[:, 1:]
  assert sorted(restored) == sorted(params)
  for name, value in params.items():
    np.testing.assert_allclose(restored[name], value, atol=1e-6,
                               err_msg=name)


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_vmoe_export_round_trips_with_stacked_experts(tmp_path, layout):
  moe = recipes.moe_config(4, 2, layers="every_2")
  _, fresh = _model_and_fresh(8, moe=moe)
  params = _random_params(fresh)
  _save_run(tmp_path / "run", params)
  arrays = export.export(tmp_path / "run", tmp_path / "vmoe.npz",
                         layout=layout)
  block = "MoeBlock_3" if layout == "vit_jax" else "MoeBlock_0"
  assert arrays[f"Transformer/encoderblock_1/{block}/Experts/Dense_0/kernel"
                ].shape == (4, 32, 64)
  init_fn = init_from.create_init_params_fn(
      dict(checkpoint=str(tmp_path / "vmoe.npz")))
  _assert_same_model(init_fn(fresh), params)


def test_export_errors_name_the_problem(tmp_path):
  _, fresh = _model_and_fresh(8)
  _save_run(tmp_path / "run", _random_params(fresh))
  with pytest.raises(ValueError, match=r"--out must be a path ending in "
                     r"\.npz, got '.*model\.bin'"):
    export.export(tmp_path / "run", tmp_path / "model.bin")
  with pytest.raises(manager.CheckpointError,
                     match=r"no checkpoint of step 3 .* saved steps: \[7\]"):
    export.export(tmp_path / "run", tmp_path / "model.npz", step=3)
  assert not (tmp_path / "model.npz").exists()


def test_export_command_line(tmp_path):
  _, fresh = _model_and_fresh(8)
  params = _random_params(fresh)
  _save_run(tmp_path / "run", params)
  out = tmp_path / "bv.npz"
  result = subprocess.run(
      [sys.executable, "-m", "moe.export", f"--workdir={tmp_path / 'run'}",
       f"--out={out}", "--layout=big_vision"],
      capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert f"wrote {out}: " in result.stdout and "layout big_vision" in (
      result.stdout)
  with np.load(out) as npz:
    assert "pos_embedding" in npz.files and npz["pos_embedding"].shape == (
        1, 16, 32)
