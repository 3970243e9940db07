r"""Parameter names of public ViT checkpoints, converted to ours and back.

Our names (`moe.nn.vit`, `moe.nn.transformer`) are those of the `.npz` files
released by google-research/vision_transformer, whose blocks were numbered
before flax's linen API, with one counter shared by every module type. The
other layouts differ only in names and in where the position embedding
lives; `to_model_names` detects which one a checkpoint uses from its names
and converts it, `from_model_names` writes ours in another layout.

Layouts (`LAYOUTS`):

  vit_jax        the released vision_transformer files (and our workdirs):
                   embedding/{kernel, bias}, cls,
                   Transformer/posembed_input/pos_embedding  [1, c + g*g, D]
                     (c = 1 class-token slot for classifier "token"),
                   Transformer/encoderblock_N/{LayerNorm_0,
                     MultiHeadDotProductAttention_1, LayerNorm_2,
                     MlpBlock_3/Dense_{0,1}} (a V-MoE block: MoeBlock_3/
                     {Router/..., Experts/Dense_{0,1}/{kernel [E, ...],
                     bias [E, ...]}}),
                   Transformer/encoder_norm, pre_logits, head.
  vit_jax_linen  the same model saved by today's flax, which numbers the
                 submodules of a block per type: LayerNorm_0,
                 MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0
                 (MoeBlock_0). vision_transformer's loader converts between
                 the two numberings with `flax.training.checkpoints.
                 convert_pre_linen`.
  big_vision     big_vision's `models/vit.py`: per-type block numbering;
                 `pos_embedding` [1, g*g, D] at the top level, added to the
                 patches before the class token is prepended, so the class
                 token has no position embedding (older files: under
                 `Transformer/pos_embedding` or `Transformer/posembed_input/`,
                 possibly with a class slot); `pool_type` "tok" (a `cls`),
                 "gap" or "map" (`MAPHead_0/{probe,
                 MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0}`,
                 inlined at the top level in early files); `scan=True`
                 stacks the blocks into `Transformer/encoderblock/...` with
                 a leading depth axis (`posemb="sincos2d"` has no parameter:
                 our learned `pos_embedding` then stays fresh, an error).
                 Train checkpoints prefix the
                 parameters with `params/` (next to `opt/...`), those of the
                 flax.optim era with `opt/target/`; only the parameters are
                 read.

Conversion to our names: a `params/` or `opt/target/` prefix is dropped
with every entry outside it; stacked blocks are split into
`encoderblock_N`; per-type block numbering is renamed; a big_vision position
embedding moves to `Transformer/posembed_input/pos_embedding` with its shape
unchanged (`moe.checkpoints.init_from`'s "resize_posemb" adds the zero
class-token slot that reproduces big_vision's model, and resizes the grid).
"""
from __future__ import annotations

import re
from typing import Mapping, NamedTuple

import numpy as np

from moe.checkpoints import manager

LAYOUTS = ("vit_jax", "vit_jax_linen", "big_vision")
POSEMB = "Transformer/posembed_input/pos_embedding"
BIG_VISION_POSEMB = "pos_embedding"
PARAM_PREFIXES = ("params/", "opt/target/")
STACKED_BLOCKS = "Transformer/encoderblock/"
MAP_HEAD = "MAPHead_0"
MAP_HEAD_CHILDREN = ("probe", "MultiHeadDotProductAttention_0", "LayerNorm_0",
                     "MlpBlock_0")
# Submodules of an encoder block: per-type (linen) numbering -> ours.
LINEN_TO_OURS = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
    "MoeBlock_0": "MoeBlock_3",
}
OURS_TO_LINEN = {ours: linen for linen, ours in LINEN_TO_OURS.items()}
_BLOCK_CHILD = re.compile(r"(Transformer/encoderblock_[0-9]+)/([^/]+)(/.*)?")
_OLD_BIG_VISION_POSEMB = ("Transformer/pos_embedding", BIG_VISION_POSEMB)

Arrays = dict[str, np.ndarray]


class LayoutError(manager.CheckpointError):
  """A checkpoint whose names fit no known layout."""


class Converted(NamedTuple):
  """A checkpoint in our names.

  Attributes:
    params: our name -> value.
    layout: the detected layout, one of `LAYOUTS`.
    notes: what the conversion did, for the log (e.g. "12 stacked blocks
      split").
    ignored: names outside the parameters (optimizer state) that were
      dropped.
  """
  params: Arrays
  layout: str
  notes: tuple[str, ...]
  ignored: tuple[str, ...]

  def describe(self) -> str:
    """One line: the layout and what the conversion did."""
    notes = list(self.notes)
    if self.ignored:
      notes.append(f"{len(self.ignored)} non-parameter entries ignored")
    return self.layout + (f" ({'; '.join(notes)})" if notes else "")


def to_model_names(arrays: Mapping[str, np.ndarray],
                   source: str = "checkpoint") -> Converted:
  """Detects the layout of a checkpoint and converts it to our names.

  Args:
    arrays: checkpoint name ('/'-joined) -> value.
    source: the checkpoint's path, for error messages.

  Returns:
    The converted checkpoint.

  Raises:
    LayoutError: naming `source`, when the names are no ViT of a known
      layout, or mix the two block numberings.
  """
  params, ignored, prefix = _strip_prefix(dict(arrays))
  notes = [f"{prefix} prefix"] if prefix else []
  big_vision = prefix is not None
  if any(name.startswith(STACKED_BLOCKS) for name in params):
    params, depth = _unstack_blocks(params, source)
    notes.append(f"{depth} stacked blocks split")
    big_vision = True
  params, linen = _renumber_blocks(params, source)
  posemb = next((name for name in _OLD_BIG_VISION_POSEMB if name in params),
                None)
  if posemb is not None:
    params[POSEMB] = params.pop(posemb)
    notes.append(f"{posemb} {tuple(np.shape(params[POSEMB]))}")
    big_vision = True
  if "probe" in params or any(n.startswith(MAP_HEAD + "/") for n in params):
    params = _nest_map_head(params)
    big_vision = True
  if not any(name.startswith(("Transformer/", "embedding/"))
             for name in params):
    raise LayoutError(
        f"{source}: unknown layout: its {len(arrays)} arrays (e.g. "
        f"{', '.join(sorted(arrays)[:4])}) are not a ViT in the names of "
        f"{', '.join(LAYOUTS)} (embedding/kernel, Transformer/encoderblock_0/"
        "..., head/kernel). To map them with rules of your own, set "
        "config.init_from.layout='none' and config.init_from.rules.")
  if POSEMB not in params and linen:
    big_vision = True
    notes.append("no position embedding: big_vision posemb='sincos2d', "
                 "which has no parameter to load")
  layout = ("big_vision" if big_vision else
            "vit_jax_linen" if linen else "vit_jax")
  return Converted(params, layout, tuple(notes), tuple(sorted(ignored)))


def _strip_prefix(arrays: Arrays
                  ) -> tuple[Arrays, list[str], str | None]:
  """Keeps the entries under `params/` or `opt/target/`, without it.

  Returns:
    (the parameters, the names of the other entries, the prefix or None).
  """
  for prefix in PARAM_PREFIXES:
    inside = {name[len(prefix):]: value for name, value in arrays.items()
              if name.startswith(prefix)}
    if inside:
      ignored = [name for name in arrays if not name.startswith(prefix)]
      return inside, ignored, prefix
  return arrays, [], None


def _unstack_blocks(params: Arrays, source: str) -> tuple[Arrays, int]:
  """`Transformer/encoderblock/X` `[depth, ...]` -> `encoderblock_N/X`."""
  stacked = {name: value for name, value in params.items()
             if name.startswith(STACKED_BLOCKS)}
  depths = {np.shape(value)[0] if np.ndim(value) else 0
            for value in stacked.values()}
  if len(depths) != 1 or 0 in depths:
    raise LayoutError(
        f"{source}: the stacked blocks {STACKED_BLOCKS}... (big_vision "
        f"scan=True) must share one leading depth axis; their leading sizes "
        f"are {sorted(depths)}.")
  unstacked = {name: value for name, value in params.items()
               if name not in stacked}
  for name, value in stacked.items():
    rest = name[len(STACKED_BLOCKS):]
    for block in range(value.shape[0]):
      unstacked[f"Transformer/encoderblock_{block}/{rest}"] = value[block]
  return unstacked, depths.pop()


def _renumber_blocks(params: Arrays, source: str) -> tuple[Arrays, bool]:
  """Renames per-type block numbering to ours; says whether it did."""
  children = {match.group(2) for name in params
              if (match := _BLOCK_CHILD.fullmatch(name))}
  ours = children & (set(OURS_TO_LINEN) - {"LayerNorm_0"})
  linen = children & (set(LINEN_TO_OURS) - {"LayerNorm_0"})
  if ours and linen:
    raise LayoutError(
        f"{source}: unknown layout: its encoder blocks mix the released "
        f"numbering ({', '.join(sorted(ours))}) and flax's per-type "
        f"numbering ({', '.join(sorted(linen))}). To map them with rules of "
        "your own, set config.init_from.layout='none' and "
        "config.init_from.rules.")
  if not linen:
    return params, False
  return _rename_block_children(params, LINEN_TO_OURS), True


def _rename_block_children(params: Arrays,
                           mapping: Mapping[str, str]) -> Arrays:
  renamed = {}
  for name, value in params.items():
    match = _BLOCK_CHILD.fullmatch(name)
    if match is not None and match.group(2) in mapping:
      name = f"{match.group(1)}/{mapping[match.group(2)]}{match.group(3) or ''}"
    renamed[name] = value
  return renamed


def _nest_map_head(params: Arrays) -> Arrays:
  """Moves an inlined MAP head (`probe`, ... at the top) into `MAPHead_0`."""
  if "probe" not in params:
    return params
  return {(f"{MAP_HEAD}/{name}" if name.split("/")[0] in MAP_HEAD_CHILDREN
           else name): value for name, value in params.items()}


def from_model_names(params: Mapping[str, np.ndarray], layout: str) -> Arrays:
  """Writes parameters in our names in another layout (for export).

  Args:
    params: our name -> value (a ViT or V-MoE of `moe.nn.vit`).
    layout: "vit_jax" (our names: the released files' numbering),
      "vit_jax_linen" or "big_vision" (per-type block numbering, bare
      parameters; the position embedding at the top level without the class
      slot, whose value is added to `cls`, so that big_vision's model, which
      gives the class token no position embedding, computes the same).

  Returns:
    name in `layout` -> value.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got "
                     f"{layout!r}.")
  params = dict(params)
  if layout == "vit_jax":
    return params
  params = _rename_block_children(params, OURS_TO_LINEN)
  if layout == "big_vision" and POSEMB in params:
    posemb = np.asarray(params.pop(POSEMB))
    if "cls" in params:
      params["cls"] = np.asarray(params["cls"]) + posemb[:, :1]
      posemb = posemb[:, 1:]
    params[BIG_VISION_POSEMB] = posemb
  return params
