r"""Initial parameters from a checkpoint: fine-tuning, upcycling, new heads.

`config.init_from` (`InitFromConfig`) makes a run start from the parameters
of a checkpoint instead of a fresh initialisation:

  python -m moe.main --config configs/digits_ft_vmoe.py --workdir DIR \
      --config.init_from.checkpoint=/tmp/digits_vit

`moe.train.trainer.train_and_evaluate` turns the section into the
`init_params_fn` of `train_state.StateLayout.initialize`, so it applies only
when a run starts: a fine-tuning run that resumes reads its own checkpoint
and ignores `init_from`.

The checkpoint is

  - a workdir of one of our runs (its latest readable checkpoint), its
    `checkpoints/` directory or one step directory `checkpoints/<step>`; only
    the parameters are read (`moe.checkpoints.restore_params`), so the source
    run's optimizer does not matter;
  - or a `.npz` (suffix in any case) of '/'-joined parameter names written by
    google-research/vision_transformer or big_vision, in any of the layouts
    of `moe.checkpoints.layouts` (both block numberings, big_vision's
    position embedding without class slot, `pool_type` tok/gap/map, stacked
    `scan=True` blocks, bare parameters or train checkpoints with `params/`
    or `opt/target/` prefixes). The layout is detected from the names and
    converted to ours (`init_from.layout="none"` reads the names as they
    are, for rules of your own); the log says which layout it was.

Every process reads the whole checkpoint into host memory; the values are
then placed shard by shard like fresh parameters.

Mapping. Each checkpoint parameter (in our names) goes through `rules`,
ordered `(regex, target, transform)` triples: the first rule whose regex fully
matches the checkpoint name (`re.fullmatch`, see `moe.config.param_names`)
and whose target, `target` expanded with the groups of the match (`\1`), is a
parameter of the model gives that parameter its initial value,
`transform(checkpoint value)`. A rule whose target is not in the model is
skipped, so one rule set serves several pairs of models (an upcycling rule
only fires for the blocks that are MoE blocks in the model); a target of
None drops the checkpoint parameter on purpose. A shape difference that the
rule's transform does not explain is an error naming both parameters and
both shapes.

A loud default. A fine-tune that silently starts mostly from scratch is the
worst outcome, so after mapping, the run stops with an error (listing the
first names, the counts and the one-line fix) when

  - a model parameter no rule reached stays fresh, unless it matches a
    `reinit` regex (e.g. the routers of an upcycled V-MoE:
    `reinit=(".*/Router/.*",)`). Parameters matching `reinit` keep their
    fresh initialisation even when the checkpoint has them;
  - a checkpoint parameter no rule used is unused, unless it matches an
    `allow_unused` regex (e.g. the `pre_logits` of the ImageNet-21k ViTs,
    `allow_unused=("pre_logits/.*",)`) or a rule drops it (target None).

The new head of a fine-tune with other classes is not fresh: "new_head"
gives it its zeros.

Transforms (`TRANSFORMS`), `[shape]` of the checkpoint -> of the model:

  None             copy; the shapes must be equal.
  "upcycle"        dense ViT MLP -> V-MoE experts: `[...]` -> `[E, ...]`,
                   every expert a copy (Komatsuzaki et al., 2022, "Sparse
                   Upcycling").
  "resize_posemb"  position embeddings `[1, c + g*g, D]` ->
                   `[1, c' + g'*g', D]` (c, c' in {0, 1} class-token slots)
                   for another image or patch size: the g x g grid is
                   resized to g' x g' by corner-aligned bilinear
                   interpolation, the same values as `scipy.ndimage.zoom(
                   grid, g'/g, order=1)` in vision_transformer's
                   `checkpoint.load_pretrained` and big_vision's
                   `vit.resample_posemb` (`resize_grid_corner_aligned`); the
                   class slot is kept, dropped when the model has no class
                   token, and added as zeros when the checkpoint has none (a
                   big_vision model, whose class token gets no position
                   embedding).
  "resize_posemb_half_pixel"
                   the same with `jax.image.resize` (half-pixel centres,
                   antialiased when shrinking): this module's behaviour
                   before it matched the reference loaders.
  "new_head"       copy when the number of classes (last axis) is the same;
                   zeros when it differs (the ViT fine-tuning recipe's
                   zero-initialised head).

Rule sets: `VIT_RULES` (ViT -> ViT, V-MoE -> V-MoE) and
`VIT_TO_VMOE_RULES` (the default: also upcycles the dense MLPs of a ViT into
the experts of the MoE blocks; otherwise like `VIT_RULES`).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, NamedTuple, Sequence
import zipfile
import zlib

from absl import logging
from etils import epath
import jax
import numpy as np

from moe.checkpoints import layouts
from moe.checkpoints import manager
from moe.config import param_names
from moe.config import schema
from moe.parallel import multihost

PyTree = Any
Shape = tuple[int, ...]
# (checkpoint value, model shape) -> initial value, or None when the
# transform cannot map the one shape to the other.
Transform = Callable[[np.ndarray, Shape], "np.ndarray | None"]

NPZ_SUFFIX = ".npz"
POSEMB = layouts.POSEMB
FIELD = "config.init_from"
LAYOUT_CHOICES = ("auto", "none")
WORKDIR_LAYOUT = "moe workdir"
# Names shown per list in the log's summary and in errors.
SHOWN_NAMES = 5


def copy(value: np.ndarray, shape: Shape) -> np.ndarray | None:
  """The value itself if it has the model's shape."""
  return value if value.shape == shape else None


def upcycle(value: np.ndarray, shape: Shape) -> np.ndarray | None:
  """A dense parameter `[...]` repeated over the expert axis: `[E, ...]`."""
  if value.shape != shape[1:]:
    return None
  return np.broadcast_to(value, shape)


def new_head(value: np.ndarray, shape: Shape) -> np.ndarray | None:
  """The head itself for the same classes, zeros for other classes."""
  if value.shape == shape:
    return value
  if value.shape[:-1] != shape[:-1]:
    return None
  return np.zeros(shape, value.dtype)


def _class_tokens_and_side(num_tokens: int) -> tuple[int, int] | None:
  """Splits T tokens into (class tokens, side of a square grid), or None."""
  for prefix in (1, 0):
    side = math.isqrt(max(num_tokens - prefix, 0))
    if num_tokens > prefix and side * side == num_tokens - prefix:
      return prefix, side
  return None


def resize_grid_corner_aligned(grid: np.ndarray,
                               side: int) -> np.ndarray:
  """Bilinear resize of a `[g, g, D]` grid to `[side, side, D]`, corners on
  corners.

  Output index i samples input position `i * (g - 1) / (side - 1)` along
  each axis (position 0 when g or side is 1), as `scipy.ndimage.zoom(grid,
  (side / g, side / g, 1), order=1)` does (its default `grid_mode=False`),
  the resize of vision_transformer's and big_vision's loaders. Computed in
  float64, returned in the grid's dtype.
  """
  resized = np.asarray(grid, np.float64)
  for axis in (0, 1):
    size = resized.shape[axis]
    if size == side:
      continue
    if size == 1 or side == 1:
      positions = np.zeros(side)
    else:
      positions = np.arange(side) * ((size - 1) / (side - 1))
    low = np.minimum(np.floor(positions).astype(int), max(size - 2, 0))
    high = np.minimum(low + 1, size - 1)
    weight = np.expand_dims(positions - low, tuple(range(1, 3 - axis)))
    resized = (np.take(resized, low, axis) * (1 - weight)
               + np.take(resized, high, axis) * weight)
  return resized.astype(grid.dtype)


def _resize_grid_half_pixel(grid: np.ndarray, side: int) -> np.ndarray:
  """`jax.image.resize` bilinear (half-pixel centres) of a `[g, g, D]` grid."""
  resized = jax.image.resize(grid.astype(np.float32),
                             (side, side, grid.shape[-1]), method="bilinear")
  return np.asarray(resized, grid.dtype)


def _resize_posemb_with(
    resize_grid: Callable[[np.ndarray, int], np.ndarray]) -> Transform:
  """The posemb transform that resizes the patch grid with `resize_grid`."""

  def resize(value: np.ndarray, shape: Shape) -> np.ndarray | None:
    if value.shape == shape:
      return value
    if (value.ndim != 3 or len(shape) != 3 or value.shape[0] != 1
        or shape[0] != 1 or value.shape[2] != shape[2]):
      return None
    source = _class_tokens_and_side(value.shape[1])
    target = _class_tokens_and_side(shape[1])
    if source is None or target is None:
      return None
    (source_prefix, source_side), (target_prefix, target_side) = source, target
    width = value.shape[2]
    grid = value[0, source_prefix:].reshape(source_side, source_side, width)
    if source_side != target_side:
      grid = resize_grid(grid, target_side)
    class_slot = (value[:, :1] if source_prefix else
                  np.zeros((1, 1, width), value.dtype))[:, :target_prefix]
    return np.concatenate(
        [class_slot, grid.reshape(1, -1, width).astype(value.dtype)], axis=1)

  return resize


resize_posemb = _resize_posemb_with(resize_grid_corner_aligned)
resize_posemb.__doc__ = """Position embeddings `[1, c + g*g, D]` resized to
`shape` `[1, c' + g'*g', D]` (c, c' in {0, 1} class-token slots).

The grid is resized by `resize_grid_corner_aligned`; the class slot is kept,
dropped when c' = 0, zeros when c = 0 < c'. Returns None when the shapes do
not fit this pattern."""
resize_posemb_half_pixel = _resize_posemb_with(_resize_grid_half_pixel)


TRANSFORMS: dict[str | None, Transform] = {
    None: copy,
    "upcycle": upcycle,
    "resize_posemb": resize_posemb,
    "resize_posemb_half_pixel": resize_posemb_half_pixel,
    "new_head": new_head,
}

_VIT_SPECIAL_RULES = (
    (POSEMB, POSEMB, "resize_posemb"),
    (r"head/(kernel|bias)", r"head/\1", "new_head"),
)
_IDENTITY_RULE = (r"(.*)", r"\1", None)
VIT_RULES = _VIT_SPECIAL_RULES + (_IDENTITY_RULE,)
VIT_TO_VMOE_RULES = _VIT_SPECIAL_RULES + (
    (r"(Transformer/encoderblock_[0-9]+)/MlpBlock_3/(.*)",
     r"\1/MoeBlock_3/Experts/\2", "upcycle"),
    _IDENTITY_RULE,
)
DEFAULT_RULES = VIT_TO_VMOE_RULES


class Rule(NamedTuple):
  """A compiled rule of `config.init_from.rules`."""
  pattern: re.Pattern
  target: str | None
  transform: str | None


def compile_rules(rules: Sequence[Sequence[Any]],
                  field: str = f"{FIELD}.rules") -> list[Rule]:
  """Checks and compiles `(regex, target[, transform])` rules.

  Args:
    rules: ordered rules; target a `re` template or None, transform a key of
      `TRANSFORMS` (None when omitted).
    field: config field of the rules, quoted in errors.

  Returns:
    The compiled rules.

  Raises:
    ValueError: naming `field` for a malformed rule, an invalid regex or an
      unknown transform.
  """
  if isinstance(rules, str) or not isinstance(rules, Sequence):
    raise ValueError(f"{field} must be a sequence of (regex, target, "
                     f"transform) rules, got {rules!r}.")
  pairs = []
  for rule in rules:
    if (isinstance(rule, str) or not isinstance(rule, Sequence)
        or len(rule) not in (2, 3)):
      raise ValueError(f"{field} must contain (regex, target) or (regex, "
                       f"target, transform) tuples, got {rule!r}.")
    pairs.append((rule[0], tuple(rule[1:]) + (None,) * (3 - len(rule))))
  compiled = []
  for pattern, (target, transform) in param_names.compile_rules(pairs, field):
    if target is not None and not isinstance(target, str):
      raise ValueError(f"{field}: the target of {pattern.pattern!r} must be "
                       f"a string or None, got {target!r}.")
    if transform not in TRANSFORMS:
      raise ValueError(
          f"{field}: the transform of {pattern.pattern!r} must be None or "
          f"one of {', '.join(repr(t) for t in TRANSFORMS if t)}; got "
          f"{transform!r}.")
    compiled.append(Rule(pattern, target, transform))
  return compiled


@dataclasses.dataclass(frozen=True)
class InitFromConfig:
  """Initialisation from a checkpoint, `config.init_from`.

  Attributes:
    checkpoint: a workdir / checkpoint directory / step directory of one of
      our runs, or a `.npz` of vision_transformer or big_vision (see the
      module docstring); None or '' starts from a fresh initialisation.
    rules: ordered `(regex, target, transform)` rules from checkpoint names
      (ours, after the layout conversion) to model names (see the module
      docstring); default `VIT_TO_VMOE_RULES`.
    reinit: regexes of model parameters that may or must start fresh: kept
      fresh even if the checkpoint has them, and no error when it does not
      (e.g. `('.*/Router/.*',)` when upcycling, `('head/.*',)`).
    allow_unused: regexes of checkpoint parameters (our names) that may go
      unused without an error (e.g. `('pre_logits/.*',)`).
    layout: "auto" (detect the layout of a `.npz` and convert it to our
      names, `moe.checkpoints.layouts`) or "none" (read the names as they
      are, for rules of your own).
  """
  checkpoint: str | None = None
  rules: Sequence[Sequence[Any]] = DEFAULT_RULES
  reinit: Sequence[str] = ()
  allow_unused: Sequence[str] = ()
  layout: str = "auto"

  def __post_init__(self):
    if self.checkpoint is not None and not isinstance(self.checkpoint, str):
      raise ValueError(f"{FIELD}.checkpoint must be a path string or None, "
                       f"got {self.checkpoint!r}.")
    compile_rules(self.rules)
    param_names.compile_regexes(self.reinit, f"{FIELD}.reinit")
    param_names.compile_regexes(self.allow_unused, f"{FIELD}.allow_unused")
    schema.check_choice(self.layout, f"{FIELD}.layout", LAYOUT_CHOICES)

  @classmethod
  def from_config(cls, section: Any) -> "InitFromConfig":
    """Parses `config.init_from` (a ConfigDict, a dict, None or an instance)."""
    return schema.parse_section(cls, section, FIELD)


class Origin(NamedTuple):
  """Where the initial value of a model parameter comes from.

  Attributes:
    source: the checkpoint parameter's name.
    source_shape: its shape.
    transform: the transform that changed the shape, None for a copy.
    shape: the model parameter's shape.
  """
  source: str
  source_shape: Shape
  transform: str | None
  shape: Shape


class InitReport(NamedTuple):
  """Where each initial parameter came from.

  Attributes:
    checkpoint: the checkpoint path.
    layout: the checkpoint's layout and what its conversion did.
    loaded: model name -> `Origin`, for the parameters taken from the
      checkpoint.
    fresh: model parameters not in the checkpoint and outside `reinit` (an
      error).
    reinit: model parameters kept fresh by `reinit`.
    unused: checkpoint parameters that no rule mapped onto the model, outside
      `allow_unused` (an error).
    allowed_unused: unused checkpoint parameters matching `allow_unused`.
    dropped: checkpoint parameters that a rule maps to None.
  """
  checkpoint: str
  layout: str
  loaded: dict[str, Origin]
  fresh: list[str]
  reinit: list[str]
  unused: list[str]
  allowed_unused: list[str]
  dropped: list[str]

  def lines(self) -> list[str]:
    """Returns the log lines: counts, transformed parameters, the lists."""
    transformed = sorted((target, origin)
                         for target, origin in self.loaded.items()
                         if origin.transform is not None)
    lines = [f"init_from {self.checkpoint} (layout {self.layout}): "
             f"{len(self.loaded)} model parameters from the checkpoint "
             f"({len(transformed)} transformed), "
             f"{len(self.fresh) + len(self.reinit)} fresh, "
             f"{len(self.unused) + len(self.allowed_unused)} checkpoint "
             "parameters unused."]
    lines += [f"  {target} {origin.shape} <- {origin.source} "
              f"{origin.source_shape} ({origin.transform})"
              for target, origin in transformed]
    for title, names in (
        ("fresh (not in the checkpoint)", self.fresh),
        (f"fresh ({FIELD}.reinit)", self.reinit),
        ("unused checkpoint parameters", self.unused),
        (f"unused checkpoint parameters ({FIELD}.allow_unused)",
         self.allowed_unused),
        ("checkpoint parameters dropped by a rule", self.dropped)):
      if names:
        lines.append(f"init_from {title}: {len(names)}")
        lines += [f"  {name}" for name in names]
    return lines

  def log(self) -> None:
    """Logs `lines()` on the main process."""
    if multihost.is_main_process():
      logging.info("%s", "\n".join(self.lines()))

  def problem(self) -> str | None:
    """The error message when parameters stay fresh or go unused, or None."""
    if not self.fresh and not self.unused:
      return None
    total = len(self.loaded) + len(self.fresh) + len(self.reinit)
    used = set(self.loaded) | set(self.reinit)
    used_sources = {origin.source for origin in self.loaded.values()}
    lines = [f"{FIELD}: {self.checkpoint} (layout {self.layout}) leaves "
             f"{len(self.fresh)} of the model's {total} parameters fresh "
             f"and {len(self.unused)} checkpoint parameters unused; a fine-"
             "tune would silently start partly from scratch."]
    fixes = []
    for names, title, flag, keep_out in (
        (self.fresh, "model parameters left fresh (not in the checkpoint)",
         "reinit", used),
        (self.unused, "checkpoint parameters no rule uses", "allow_unused",
         used_sources)):
      if names:
        lines.append(f"  {title}: {_first_names(names)}")
        regexes = covering_regexes(names, keep_out)
        fixes.append(f'--{FIELD}.{flag}="{tuple(regexes)!r}"')
    lines.append(
        f"  If that is intended: {' '.join(fixes)}. Otherwise the names do "
        f"not match: map them with a rule in {FIELD}.rules (regex, target, "
        "transform), or check the checkpoint is the model's.")
    return "\n".join(lines)


class IncompleteInitError(ValueError):
  """Model parameters left fresh or checkpoint parameters unused."""


def _first_names(names: Sequence[str]) -> str:
  shown = ", ".join(names[:SHOWN_NAMES])
  more = len(names) - SHOWN_NAMES
  return f"{len(names)}: {shown}" + (f", ... ({more} more)" if more > 0
                                     else "")


def covering_regexes(names: Sequence[str],
                     keep_out: Sequence[str]) -> list[str]:
  """Few regexes that match all of `names` and none of `keep_out`.

  Each name is covered by the shortest '/'-prefix `P/.*` (with the block
  number generalised to `[0-9]+`, else as it is) that matches nothing in
  `keep_out`, or by the escaped name itself.

  Args:
    names: the names to cover, e.g. fresh model parameters.
    keep_out: names the regexes must not match, e.g. loaded parameters.

  Returns:
    The distinct regexes, in the order of `names`.
  """
  regexes = []
  for name in names:
    regex = _shortest_safe_prefix(name.split("/"), keep_out)
    if regex not in regexes:
      regexes.append(regex)
  return regexes


def _shortest_safe_prefix(parts: Sequence[str], keep_out: Sequence[str]
                          ) -> str:
  """`P/.*` for the shortest prefix P of `parts` matching nothing in
  `keep_out` (block numbers generalised first, then literal), or the name."""
  for depth in range(1, len(parts)):
    literal = [re.escape(part) for part in parts[:depth]]
    general = [re.sub(r"^encoderblock_[0-9]+$", "encoderblock_[0-9]+", part)
               for part in literal]
    for prefix in dict.fromkeys(("/".join(general), "/".join(literal))):
      pattern = re.compile(prefix + "/.*")
      if not any(pattern.fullmatch(other) for other in keep_out):
        return pattern.pattern
  return re.escape("/".join(parts))


def read_checkpoint(path: str, layout: str = "auto") -> layouts.Converted:
  """Reads the parameters of a checkpoint in our names.

  Args:
    path: a `.npz` file (suffix in any case), or a workdir / checkpoint dir /
      step dir of a run.
    layout: "auto" converts a `.npz` from its detected layout
      (`layouts.to_model_names`); "none" keeps its names.

  Returns:
    The parameters (name -> host array), with the layout they came in.

  Raises:
    manager.CheckpointError: naming the path, if it does not exist, holds no
      readable checkpoint, or (`layouts.LayoutError`) no ViT of a known
      layout.
  """
  schema.check_choice(layout, f"{FIELD}.layout", LAYOUT_CHOICES)
  if not str(path).lower().endswith(NPZ_SUFFIX):
    params = dict(param_names.named_leaves(manager.restore_params(path)))
    return layouts.Converted(params, WORKDIR_LAYOUT, (), ())
  arrays = load_npz(path)
  if layout == "none":
    return layouts.Converted(arrays, "none (names as they are)", (), ())
  return layouts.to_model_names(arrays, f"checkpoint {path}")


def load_checkpoint(path: str) -> dict[str, np.ndarray]:
  """The parameters of `read_checkpoint(path)`, by our '/'-joined names."""
  return read_checkpoint(path).params


def load_npz(path: str) -> dict[str, np.ndarray]:
  """Reads every array of a `.npz` of '/'-joined names, as saved.

  bfloat16 arrays, which numpy saves as 2-byte void, are viewed back as
  bfloat16 (as big_vision's loader does).

  Raises:
    manager.CheckpointError: naming the path and what is wrong: missing, not
      an `.npz` archive (e.g. a single `.npy` array), unreadable (truncated,
      pickled objects), or holding no arrays.
  """
  path = epath.Path(path)
  if not path.exists():
    raise manager.CheckpointError(f"checkpoint path {path} does not "
                                  "exist.")
  try:
    with path.open("rb") as f:
      loaded = np.load(f, allow_pickle=False)
      if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise manager.CheckpointError(
            f"checkpoint {path} is not an .npz archive: numpy reads it as one "
            f"array of shape {np.shape(loaded)} (an .npy file?); save the "
            "parameters by name with np.savez.")
      with loaded as npz:
        arrays = {name: _recover_bfloat16(npz[name]) for name in npz.files}
  except manager.CheckpointError:
    raise
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError,
          ValueError) as error:
    raise manager.CheckpointError(
        f"checkpoint {path} is not a readable .npz archive (truncated or "
        f"corrupt?): {type(error).__name__}: {error}") from error
  if not arrays:
    raise manager.CheckpointError(f"checkpoint {path} holds no arrays.")
  return arrays


def _recover_bfloat16(value: np.ndarray) -> np.ndarray:
  if value.dtype.type is np.void and value.dtype.itemsize == 2:
    return value.view(jax.numpy.bfloat16)
  return value


def map_checkpoint(
    model_shapes: Mapping[str, Shape], checkpoint: Mapping[str, np.ndarray],
    config: InitFromConfig) -> tuple[dict[str, np.ndarray], InitReport]:
  """Maps checkpoint parameters onto model parameters by the config's rules.

  Args:
    model_shapes: model parameter name -> shape.
    checkpoint: checkpoint parameter name -> value.
    config: the `init_from` config (rules, reinit, allow_unused).

  Returns:
    (model name -> initial value for the parameters taken from the
    checkpoint, the report; its `problem()` says whether the mapping is
    incomplete).

  Raises:
    ValueError: for a shape difference no rule explains (naming both
      parameters and shapes), two checkpoint parameters mapped onto one
      model parameter, or a `reinit` regex that matches no model parameter.
  """
  rules = compile_rules(config.rules)
  reinit_patterns = param_names.compile_regexes(config.reinit,
                                                f"{FIELD}.reinit")
  param_names.check_every_pattern_matches(reinit_patterns, list(model_shapes),
                                          f"{FIELD}.reinit")
  values, loaded = {}, {}
  reinit, unused, dropped = [], [], []
  for source, value in checkpoint.items():
    value = np.asarray(value)
    rule, target = _applicable_rule(rules, source, model_shapes)
    if rule is None:
      unused.append(source)
      continue
    if target is None:
      dropped.append(source)
      continue
    if target in loaded:
      raise ValueError(
          f"{FIELD}.rules map both checkpoint parameters "
          f"{loaded[target].source!r} and {source!r} onto {target!r}.")
    shape = tuple(model_shapes[target])
    transform = rule.transform if value.shape != shape else None
    loaded[target] = Origin(source, value.shape, transform, shape)
    if param_names.matches_any(reinit_patterns, target):
      reinit.append(target)
      continue
    initial = TRANSFORMS[rule.transform](value, shape)
    if initial is None:
      how = (f"the rule {rule.pattern.pattern!r}'s transform "
             f"{rule.transform!r} cannot map one onto the other"
             if rule.transform else
             f"the rule {rule.pattern.pattern!r} copies without a transform "
             "and no earlier rule explains the difference")
      raise ValueError(
          f"{FIELD}: checkpoint parameter {source!r} has shape "
          f"{value.shape} but model parameter {target!r} has shape {shape}; "
          f"{how}. Add a rule with a transform to {FIELD}.rules, or list "
          f"the parameter in {FIELD}.reinit to keep it fresh.")
    values[target] = initial
  for target in reinit:
    del loaded[target]
  return values, _report(model_shapes, loaded, unused, dropped, config,
                         reinit_patterns)


def _report(model_shapes: Mapping[str, Shape], loaded: dict[str, Origin],
            unused: list[str], dropped: list[str], config: InitFromConfig,
            reinit_patterns: Sequence[re.Pattern]) -> InitReport:
  """Sorts the parameters not loaded into allowed and not allowed ones."""
  allow_patterns = param_names.compile_regexes(config.allow_unused,
                                               f"{FIELD}.allow_unused")
  not_loaded = sorted(set(model_shapes) - set(loaded))
  reinit = [name for name in not_loaded
            if param_names.matches_any(reinit_patterns, name)]
  allowed = sorted(name for name in unused
                   if param_names.matches_any(allow_patterns, name))
  return InitReport(
      checkpoint=config.checkpoint or "", layout="", loaded=loaded,
      fresh=sorted(set(not_loaded) - set(reinit)), reinit=reinit,
      unused=sorted(set(unused) - set(allowed)), allowed_unused=allowed,
      dropped=sorted(dropped))


def _applicable_rule(rules: Sequence[Rule], source: str,
                     model_shapes: Mapping[str, Shape]
                     ) -> tuple[Rule | None, str | None]:
  """Returns the first rule that maps `source` onto the model, and its target.

  A rule applies when its regex fully matches `source` and its expanded
  target is a model parameter or the target is None.
  """
  for rule in rules:
    match = rule.pattern.fullmatch(source)
    if match is None:
      continue
    if rule.target is None:
      return rule, None
    target = match.expand(rule.target)
    if target in model_shapes:
      return rule, target
  return None, None


def init_params(fresh: PyTree, checkpoint: Mapping[str, np.ndarray],
                config: InitFromConfig,
                layout: str = "") -> tuple[PyTree, InitReport]:
  """Replaces fresh parameters by those mapped from a checkpoint.

  Args:
    fresh: the model's fresh parameters (arrays or `jax.ShapeDtypeStruct`s).
    checkpoint: checkpoint parameter name -> value (`load_checkpoint`).
    config: the `init_from` config.
    layout: the checkpoint's layout, for the report.

  Returns:
    (the parameters: host arrays where the checkpoint gives a value, the
    fresh leaves elsewhere; the report).

  Raises:
    IncompleteInitError: after logging the report, when a model parameter
      outside `reinit` stays fresh or a checkpoint parameter outside
      `allow_unused` is unused; the message lists them and the fix.
  """
  model_shapes = {name: tuple(leaf.shape)
                  for name, leaf in param_names.named_leaves(fresh)}
  values, report = map_checkpoint(model_shapes, checkpoint, config)
  report = report._replace(layout=layout)
  problem = report.problem()
  if problem is not None:
    report.log()
    raise IncompleteInitError(problem)
  params = param_names.map_with_names(
      lambda name, leaf: values.get(name, leaf), fresh)
  return params, report


def create_init_params_fn(
    section: Any) -> Callable[[PyTree], PyTree] | None:
  """Returns the fine-tuning hook of `config.init_from`, or None.

  Args:
    section: `config.init_from` (ConfigDict, dict, `InitFromConfig` or None).

  Returns:
    None without a checkpoint; otherwise fresh params -> initial params,
    which reads the checkpoint when called and logs the `InitReport`.
  """
  config = InitFromConfig.from_config(section)
  if not config.checkpoint:
    return None

  def init_params_fn(fresh: PyTree) -> PyTree:
    converted = read_checkpoint(config.checkpoint, config.layout)
    params, report = init_params(fresh, converted.params, config,
                                 converted.describe())
    report.log()
    return params

  return init_params_fn
