"""Independent references for ViT checkpoints: writers, loaders, a forward.

Nothing here imports `moe`. Trees are nested dicts of numpy arrays with the
names of the reference codebases:

  - google-research/vision_transformer (`vit_jax`): the model as today's
    flax names it (`vit_jax_tree`), or as the released `.npz` files number it
    (`pre_linen`: one counter shared by all module types in a block);
  - big_vision (`big_vision_tree`): `pos_embedding` at the top without class
    slot, `pool_type` tok / gap / map, `stack_blocks` for `scan=True`.

The loaders follow those codebases' own (`vit_jax/checkpoint.py`:
`load` + `load_pretrained`; big_vision `utils.load_params` +
`models/vit.py: load`), with flax's real `convert_pre_linen` and scipy's
`ndimage.zoom(order=1)` for the position-embedding resize. The forward pass
is plain float64 numpy: patch embedding, pre-LN blocks, GELU in the tanh form
of flax's `nn.gelu` (its default, which both codebases use), class token,
GAP or MAP pooling, tanh pre-logits, head.
"""
import collections
import math

from flax.training import checkpoints as flax_checkpoints
import numpy as np
from scipy import ndimage

LN_EPSILON = 1e-6  # flax.linen.LayerNorm's default.


# --- random trees in the reference names ----------------------------------

def _attention(rng, width, heads):
  head_dim = width // heads
  qkv = {name: {"kernel": rng.normal(size=(width, heads, head_dim))
                / math.sqrt(width),
                "bias": rng.normal(size=(heads, head_dim)) * 0.1}
         for name in ("query", "key", "value")}
  qkv["out"] = {"kernel": rng.normal(size=(heads, head_dim, width))
                / math.sqrt(width),
                "bias": rng.normal(size=(width,)) * 0.1}
  return qkv


def _layer_norm(rng, width):
  return {"scale": 1 + 0.1 * rng.normal(size=(width,)),
          "bias": 0.1 * rng.normal(size=(width,))}


def _mlp(rng, width, mlp_dim):
  return {"Dense_0": {"kernel": rng.normal(size=(width, mlp_dim))
                      / math.sqrt(width),
                      "bias": 0.1 * rng.normal(size=(mlp_dim,))},
          "Dense_1": {"kernel": rng.normal(size=(mlp_dim, width))
                      / math.sqrt(mlp_dim),
                      "bias": 0.1 * rng.normal(size=(width,))}}


def _block(rng, width, mlp_dim, heads):
  """An encoder block with today's flax (per-type) numbering."""
  return {"LayerNorm_0": _layer_norm(rng, width),
          "MultiHeadDotProductAttention_0": _attention(rng, width, heads),
          "LayerNorm_1": _layer_norm(rng, width),
          "MlpBlock_0": _mlp(rng, width, mlp_dim)}


def _common(rng, *, width=32, depth=2, mlp_dim=64, heads=2, patch=2,
            channels=3, classes=10, rep_size=None):
  """The parts both codebases share: embedding, blocks, norm, head."""
  tree = {
      "embedding": {"kernel": rng.normal(size=(patch, patch, channels, width))
                              / patch,
                    "bias": 0.1 * rng.normal(size=(width,))},
      "Transformer": {f"encoderblock_{i}": _block(rng, width, mlp_dim, heads)
                      for i in range(depth)},
  }
  tree["Transformer"]["encoder_norm"] = _layer_norm(rng, width)
  head_in = width
  if rep_size:
    tree["pre_logits"] = {"kernel": rng.normal(size=(width, rep_size))
                                    / math.sqrt(width),
                          "bias": 0.1 * rng.normal(size=(rep_size,))}
    head_in = rep_size
  tree["head"] = {"kernel": rng.normal(size=(head_in, classes))
                            / math.sqrt(head_in),
                  "bias": 0.1 * rng.normal(size=(classes,))}
  return tree


def vit_jax_tree(seed=0, *, classifier="token", grid=4, **sizes):
  """A vision_transformer ViT as its model names it under today's flax;
  `sizes` are those of `_common`."""
  rng = np.random.default_rng(seed)
  tree = _common(rng, **sizes)
  width = tree["embedding"]["bias"].shape[0]
  slots = 1 if classifier == "token" else 0
  if slots:
    tree["cls"] = 0.5 * rng.normal(size=(1, 1, width))
  tree["Transformer"]["posembed_input"] = {
      "pos_embedding": 0.5 * rng.normal(size=(1, slots + grid * grid, width))}
  return _float32(tree)


def big_vision_tree(seed=0, *, pool_type="tok", grid=4, **sizes):
  """A big_vision ViT (`models/vit.py`, posemb="learn"); `sizes` are those
  of `_common`."""
  rng = np.random.default_rng(seed)
  tree = _common(rng, **sizes)
  width = tree["embedding"]["bias"].shape[0]
  mlp_dim = tree["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"][
      "bias"].shape[0]
  heads = tree["Transformer"]["encoderblock_0"][
      "MultiHeadDotProductAttention_0"]["query"]["bias"].shape[0]
  tree["pos_embedding"] = 0.5 * rng.normal(size=(1, grid * grid, width))
  if pool_type == "tok":
    tree["cls"] = 0.5 * rng.normal(size=(1, 1, width))
  if pool_type == "map":
    tree["MAPHead_0"] = {
        "probe": rng.normal(size=(1, 1, width)),
        "MultiHeadDotProductAttention_0": _attention(rng, width, heads),
        "LayerNorm_0": _layer_norm(rng, width),
        "MlpBlock_0": _mlp(rng, width, mlp_dim)}
  return _float32(tree)


def _float32(tree):
  if isinstance(tree, dict):
    return {key: _float32(value) for key, value in tree.items()}
  return np.asarray(tree, np.float32)


def pre_linen(tree):
  """The released files' numbering: one counter per block for all types."""
  tree = {key: dict(value) if isinstance(value, dict) else value
          for key, value in tree.items()}
  released = {"LayerNorm_0": "LayerNorm_0",
              "MultiHeadDotProductAttention_0":
                  "MultiHeadDotProductAttention_1",
              "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}
  transformer = dict(tree["Transformer"])
  for name, block in transformer.items():
    if name.startswith("encoderblock_"):
      transformer[name] = {released[key]: value for key, value in
                           block.items()}
  tree["Transformer"] = transformer
  return tree


def stack_blocks(tree):
  """big_vision's `scan=True` layout: `Transformer/encoderblock` stacked."""
  transformer = dict(tree["Transformer"])
  depth = sum(name.startswith("encoderblock_") for name in transformer)
  blocks = [transformer.pop(f"encoderblock_{i}") for i in range(depth)]
  transformer["encoderblock"] = _map(lambda *x: np.stack(x), *blocks)
  return {**tree, "Transformer": transformer}


def _map(fn, tree, *rest):
  if isinstance(tree, dict):
    return {key: _map(fn, tree[key], *(r[key] for r in rest)) for key in tree}
  return fn(tree, *rest)


def flatten(tree, prefix=""):
  """'/'-joined names -> arrays, as both codebases' `.npz` writers name them."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}/"))
    else:
      flat[prefix + key] = value
  return flat


def save_npz(path, tree):
  np.savez(path, **flatten(tree))


def optimizer_state_like(params, seed=1):
  """A momentum-like optimizer state with the parameters' structure."""
  rng = np.random.default_rng(seed)
  return _map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)


# --- the reference loaders -------------------------------------------------

def recover_tree(flat):
  """Nested dict from '/'-joined names (both codebases' `recover_tree`)."""
  tree = {}
  children = collections.defaultdict(dict)
  for name, value in flat.items():
    if "/" in name:
      head, rest = name.split("/", 1)
      children[head][rest] = value
    else:
      tree[name] = value
  for head, rest in children.items():
    tree[head] = recover_tree(rest)
  return tree


def _unfreeze(tree):
  if hasattr(tree, "items"):
    return {key: _unfreeze(value) for key, value in tree.items()}
  return tree


def _zoom(grid, new_side):
  side = grid.shape[0]
  return ndimage.zoom(grid, (new_side / side, new_side / side, 1), order=1)


def vit_jax_load(path, *, classifier, grid):
  """vision_transformer's `checkpoint.load` then `load_pretrained`'s posemb
  resize to a `grid` x `grid` patch grid (the head is kept)."""
  with np.load(path, allow_pickle=False) as npz:
    flat = dict(npz)
  params = _unfreeze(flax_checkpoints.convert_pre_linen(recover_tree(flat)))
  posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
  slots = 1 if classifier == "token" else 0
  if posemb.shape[1] != slots + grid * grid:
    tok, posemb_grid = posemb[:, :slots], posemb[0, slots:]
    old = int(np.sqrt(len(posemb_grid)))
    posemb_grid = _zoom(posemb_grid.reshape(old, old, -1), grid)
    params["Transformer"]["posembed_input"]["pos_embedding"] = np.concatenate(
        [tok, posemb_grid.reshape(1, grid * grid, -1)], axis=1)
  return params


def big_vision_load(path, *, grid):
  """big_vision's `utils.load_params` and `vit.load` for a non-scan model
  with a `grid` x `grid` patch grid."""
  with np.load(path, allow_pickle=False) as npz:
    checkpoint = recover_tree(dict(npz))
  if "params" in checkpoint:
    params = checkpoint["params"]
  elif "opt" in checkpoint:
    params = checkpoint["opt"]["target"]
  else:
    params = checkpoint
  params = _unfreeze(flax_checkpoints.convert_pre_linen(params))
  transformer = params["Transformer"]
  if "posembed_input" in transformer:
    params["pos_embedding"] = transformer.pop("posembed_input")[
        "pos_embedding"]
  if "pos_embedding" in transformer:
    params["pos_embedding"] = transformer.pop("pos_embedding")
  posemb = params["pos_embedding"]
  if int(np.sqrt(posemb.shape[1])) ** 2 + 1 == posemb.shape[1]:
    params["pos_embedding"] = posemb[:, 1:]
    if "cls" in params:
      params["cls"] = params["cls"] + posemb[:, :1]
  if "probe" in params:
    params["MAPHead_0"] = {key: params.pop(key) for key in (
        "probe", "MlpBlock_0", "MultiHeadDotProductAttention_0",
        "LayerNorm_0")}
  if "encoderblock" in transformer:
    stacked = transformer.pop("encoderblock")
    depth = len(stacked["LayerNorm_0"]["bias"])
    for i in range(depth):
      transformer[f"encoderblock_{i}"] = _map(lambda x, i=i: x[i], stacked)
  posemb = params["pos_embedding"]
  if posemb.shape[1] != grid * grid:
    old = int(np.sqrt(posemb.shape[1]))
    params["pos_embedding"] = _zoom(posemb.reshape(old, old, -1), grid
                                    ).reshape(1, grid * grid, -1)
  return params


# --- the forward pass ------------------------------------------------------

def gelu(x):
  """flax's `nn.gelu` (approximate=True, its default): the tanh form."""
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def gelu_erf(x):
  """The erf GELU, to show the references can tell the two apart."""
  from scipy import special  # pylint: disable=g-import-not-at-top
  return 0.5 * x * (1 + special.erf(x / np.sqrt(2)))


def layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + LN_EPSILON) * p["scale"] + p["bias"]


def attention(queries, tokens, p):
  """Multi-head attention of flax's `MultiHeadDotProductAttention`."""
  def project(x, name):
    return np.einsum("bld,dhk->blhk", x, p[name]["kernel"]) + p[name]["bias"]
  q, k, v = (project(queries, "query"), project(tokens, "key"),
             project(tokens, "value"))
  logits = np.einsum("bqhk,blhk->bhql", q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  mixed = np.einsum("bhql,blhk->bqhk", weights, v)
  return np.einsum("bqhk,hkd->bqd", mixed, p["out"]["kernel"]) + p["out"][
      "bias"]


def mlp(x, p, activation=gelu):
  hidden = activation(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  return hidden @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def encoder_block(x, p, activation=gelu):
  """A pre-LN block with today's flax (per-type) numbering."""
  y = layer_norm(x, p["LayerNorm_0"])
  x = x + attention(y, y, p["MultiHeadDotProductAttention_0"])
  return x + mlp(layer_norm(x, p["LayerNorm_1"]), p["MlpBlock_0"], activation)


def patch_embedding(images, p):
  """`nn.Conv` with kernel = stride = patch size, VALID: `[B, g*g, D]`."""
  kernel = p["kernel"]
  patch = kernel.shape[0]
  batch, height, width, channels = images.shape
  patches = images.reshape(batch, height // patch, patch, width // patch,
                           patch, channels)
  embedded = np.einsum("bipjqc,pqcd->bijd", patches, kernel) + p["bias"]
  return embedded.reshape(batch, -1, kernel.shape[-1])


def vit_forward(params, images, *, pool, posemb_before_cls,
                activation=gelu):
  """Logits of a ViT tree in today's flax names (as the loaders return).

  Args:
    params: the tree (`vit_jax_load` or `big_vision_load` output).
    images: `[B, h, w, C]`.
    pool: "token" / "tok", "gap" or "map".
    posemb_before_cls: big_vision's order (position embedding added to the
      patches, then the class token prepended) instead of vision_transformer's
      (class token prepended, then the position embedding added to all).
    activation: the MLP's GELU.

  Returns:
    `[B, classes]` float64 logits.
  """
  x = patch_embedding(np.asarray(images, np.float64), params["embedding"])
  transformer = params["Transformer"]
  if posemb_before_cls:
    x = x + params["pos_embedding"]
  if pool in ("token", "tok"):
    cls = np.broadcast_to(params["cls"], (x.shape[0], 1, x.shape[-1]))
    x = np.concatenate([cls, x], axis=1)
  if not posemb_before_cls:
    x = x + transformer["posembed_input"]["pos_embedding"]
  depth = sum(name.startswith("encoderblock_") for name in transformer)
  for i in range(depth):
    x = encoder_block(x, transformer[f"encoderblock_{i}"], activation)
  x = layer_norm(x, transformer["encoder_norm"])
  if pool in ("token", "tok"):
    x = x[:, 0]
  elif pool == "gap":
    x = x.mean(axis=1)
  else:
    head = params["MAPHead_0"]
    probe = np.broadcast_to(head["probe"], (x.shape[0], 1, x.shape[-1]))
    y = attention(probe, x, head["MultiHeadDotProductAttention_0"])
    x = (y + mlp(layer_norm(y, head["LayerNorm_0"]), head["MlpBlock_0"],
                 activation))[:, 0]
  if "pre_logits" in params:
    x = np.tanh(x @ params["pre_logits"]["kernel"] + params["pre_logits"][
        "bias"])
  return x @ params["head"]["kernel"] + params["head"]["bias"]
