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
  - or a `.npz` (suffix in any case) of '/'-joined parameter names in the layout of the public
    ViT checkpoints of google-research/vision_transformer (and big_vision,
    whose names may carry a `params/` prefix, dropped here):
    `embedding/kernel`, `cls`, `Transformer/posembed_input/pos_embedding`,
    `Transformer/encoderblock_N/{LayerNorm_0, MultiHeadDotProductAttention_1,
    LayerNorm_2, MlpBlock_3/Dense_0, MlpBlock_3/Dense_1}/...`,
    `Transformer/encoder_norm/...`, `pre_logits/...`, `head/...` — the names
    of `moe.nn.vit`.

Every process reads the whole checkpoint into host memory; the values are
then placed shard by shard like fresh parameters.

Mapping. Each checkpoint parameter goes through `rules`, ordered
`(regex, target, transform)` triples: the first rule whose regex fully
matches the checkpoint name (`re.fullmatch`, see `moe.config.param_names`)
and whose target, `target` expanded with the groups of the match (`\1`), is a
parameter of the model gives that parameter its initial value,
`transform(checkpoint value)`. A rule whose target is not in the model is
skipped, so one rule set serves several pairs of models (an upcycling rule
only fires for the blocks that are MoE blocks in the model); a target of
None drops the checkpoint parameter on purpose. Then

  - model parameters no rule reached keep their fresh initialisation (e.g.
    the routers of an upcycled V-MoE) and are listed in the log;
  - checkpoint parameters no rule used are listed in the log as unused
    (e.g. the `pre_logits` of the ImageNet-21k ViTs);
  - model parameters matching a `reinit` regex keep their fresh
    initialisation even when the checkpoint has them;
  - a shape difference that the rule's transform does not explain is an
    error naming both parameters and both shapes.

Transforms (`TRANSFORMS`), `[shape]` of the checkpoint -> of the model:

  None             copy; the shapes must be equal.
  "upcycle"        dense ViT MLP -> V-MoE experts: `[...]` -> `[E, ...]`,
                   every expert a copy (Komatsuzaki et al., 2022, "Sparse
                   Upcycling").
  "resize_posemb"  position embeddings `[1, T, D]` -> `[1, T', D]` for
                   another image or patch size: bilinear resize of the square
                   patch grid (`jax.image.resize`: half-pixel centres,
                   antialiased when shrinking, as big_vision does); the class
                   token is kept (dropped if the model has none).
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
BIG_VISION_PREFIX = "params/"
POSEMB = "Transformer/posembed_input/pos_embedding"
FIELD = "config.init_from"


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


def resize_posemb(value: np.ndarray, shape: Shape) -> np.ndarray | None:
  """Position embeddings `[1, T, D]` resized to `shape` `[1, T', D]`.

  T = c + g^2 and T' = c' + g'^2 with c, c' in {0, 1} class tokens; the
  g x g grid is resized bilinearly to g' x g', the class token is kept
  (dropped when c' = 0).

  Args:
    value: the checkpoint's position embeddings.
    shape: the model's shape.

  Returns:
    The resized embeddings, or None if the shapes do not fit this pattern.
  """
  if value.shape == shape:
    return value
  if (value.ndim != 3 or len(shape) != 3 or value.shape[0] != shape[0]
      or value.shape[2] != shape[2]):
    return None
  source = _class_tokens_and_side(value.shape[1])
  target = _class_tokens_and_side(shape[1])
  if source is None or target is None or target[0] > source[0]:
    return None
  (source_prefix, source_side), (target_prefix, target_side) = source, target
  batch, _, width = value.shape
  grid = value[:, source_prefix:].reshape(batch, source_side, source_side,
                                          width)
  resized = jax.image.resize(grid.astype(np.float32),
                             (batch, target_side, target_side, width),
                             method="bilinear")
  resized = np.asarray(resized, value.dtype).reshape(batch, -1, width)
  return np.concatenate([value[:, :target_prefix], resized], axis=1)


TRANSFORMS: dict[str | None, Transform] = {
    None: copy,
    "upcycle": upcycle,
    "resize_posemb": resize_posemb,
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
      our runs, or a `.npz` in the public ViT layout (see the module
      docstring); None or '' starts from a fresh initialisation.
    rules: ordered `(regex, target, transform)` rules from checkpoint names
      to model names (see the module docstring); default
      `VIT_TO_VMOE_RULES`.
    reinit: regexes of model parameters that keep their fresh
      initialisation even if the checkpoint has them (e.g. `('head/.*',)`).
  """
  checkpoint: str | None = None
  rules: Sequence[Sequence[Any]] = DEFAULT_RULES
  reinit: Sequence[str] = ()

  def __post_init__(self):
    if self.checkpoint is not None and not isinstance(self.checkpoint, str):
      raise ValueError(f"{FIELD}.checkpoint must be a path string or None, "
                       f"got {self.checkpoint!r}.")
    compile_rules(self.rules)
    param_names.compile_regexes(self.reinit, f"{FIELD}.reinit")

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
    loaded: model name -> `Origin`, for the parameters taken from the
      checkpoint.
    fresh: model parameters not in the checkpoint (fresh initialisation).
    reinit: model parameters kept fresh by `reinit` although the checkpoint
      has them.
    unused: checkpoint parameters that no rule mapped onto the model.
    dropped: checkpoint parameters that a rule maps to None.
  """
  checkpoint: str
  loaded: dict[str, Origin]
  fresh: list[str]
  reinit: list[str]
  unused: list[str]
  dropped: list[str]

  def lines(self) -> list[str]:
    """Returns the log lines: counts, transformed parameters, the lists."""
    transformed = sorted((target, origin)
                         for target, origin in self.loaded.items()
                         if origin.transform is not None)
    lines = [f"init_from {self.checkpoint}: {len(self.loaded)} model "
             f"parameters from the checkpoint ({len(transformed)} "
             f"transformed), {len(self.fresh) + len(self.reinit)} fresh, "
             f"{len(self.unused)} checkpoint parameters unused."]
    lines += [f"  {target} {origin.shape} <- {origin.source} "
              f"{origin.source_shape} ({origin.transform})"
              for target, origin in transformed]
    for title, names in (
        ("fresh (not in the checkpoint)", self.fresh),
        ("fresh (config.init_from.reinit)", self.reinit),
        ("unused checkpoint parameters", self.unused),
        ("checkpoint parameters dropped by a rule", self.dropped)):
      if names:
        lines.append(f"init_from {title}: {len(names)}")
        lines += [f"  {name}" for name in names]
    return lines

  def log(self) -> None:
    """Logs `lines()` on the main process."""
    if multihost.is_main_process():
      logging.info("%s", "\n".join(self.lines()))


def load_checkpoint(path: str) -> dict[str, np.ndarray]:
  """Reads the parameters of a checkpoint, by '/'-joined name.

  Args:
    path: a `.npz` file, or a workdir / checkpoint dir / step dir of a run.

  Returns:
    name -> host array.

  Raises:
    manager.CheckpointError: if the path does not exist or holds no
      readable checkpoint.
  """
  if str(path).lower().endswith(NPZ_SUFFIX):
    return load_npz(path)
  return dict(param_names.named_leaves(manager.restore_params(path)))


def load_npz(path: str) -> dict[str, np.ndarray]:
  """Reads a `.npz` of '/'-joined names; drops a big_vision `params/` prefix.

  When some names start with `params/`, only those are parameters (the
  others, e.g. big_vision's `opt/...`, are ignored).

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
        arrays = {name: npz[name] for name in npz.files}
  except manager.CheckpointError:
    raise
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError,
          ValueError) as error:
    raise manager.CheckpointError(
        f"checkpoint {path} is not a readable .npz archive (truncated or "
        f"corrupt?): {type(error).__name__}: {error}") from error
  if not arrays:
    raise manager.CheckpointError(f"checkpoint {path} holds no arrays.")
  params = {name[len(BIG_VISION_PREFIX):]: value
            for name, value in arrays.items()
            if name.startswith(BIG_VISION_PREFIX)}
  return params or arrays


def map_checkpoint(
    model_shapes: Mapping[str, Shape], checkpoint: Mapping[str, np.ndarray],
    config: InitFromConfig) -> tuple[dict[str, np.ndarray], InitReport]:
  """Maps checkpoint parameters onto model parameters by the config's rules.

  Args:
    model_shapes: model parameter name -> shape.
    checkpoint: checkpoint parameter name -> value.
    config: the `init_from` config (rules and reinit).

  Returns:
    (model name -> initial value for the parameters taken from the
    checkpoint, the report).

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
  fresh = sorted(set(model_shapes) - set(loaded) - set(reinit))
  report = InitReport(checkpoint="", loaded=loaded, fresh=fresh,
                      reinit=sorted(reinit), unused=sorted(unused),
                      dropped=sorted(dropped))
  return values, report


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
                config: InitFromConfig) -> tuple[PyTree, InitReport]:
  """Replaces fresh parameters by those mapped from a checkpoint.

  Args:
    fresh: the model's fresh parameters (arrays or `jax.ShapeDtypeStruct`s).
    checkpoint: checkpoint parameter name -> value (`load_checkpoint`).
    config: the `init_from` config.

  Returns:
    (the parameters: host arrays where the checkpoint gives a value, the
    fresh leaves elsewhere; the report).
  """
  model_shapes = {name: tuple(leaf.shape)
                  for name, leaf in param_names.named_leaves(fresh)}
  values, report = map_checkpoint(model_shapes, checkpoint, config)
  params = param_names.map_with_names(
      lambda name, leaf: values.get(name, leaf), fresh)
  return params, report._replace(checkpoint=config.checkpoint or "")


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
    params, report = init_params(fresh, load_checkpoint(config.checkpoint),
                                 config)
    report.log()
    return params

  return init_params_fn
