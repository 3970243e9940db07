"""Optax optimizers and learning-rate schedules from `config.optimizer`.

`create_optimizer(config.optimizer, total_steps)` returns an `Optimizer`: the
optax transformation used in the train step and the schedule it follows, so
the trainer can log the learning rate. Everything is decided by config:

  config.optimizer = ml_collections.ConfigDict(dict(
      name='adamw', learning_rate=1e-3, weight_decay=0.1,
      schedule=dict(name='warmup_cosine', warmup_steps=500),
      grad_clip_norm=1.0,
      frozen_params=('embedding/.*',),
      lr_mults=(('head/.*', 10.0),),
      accumulation_steps=1))

Fields and defaults are the attributes of `OptimizerConfig` and
`ScheduleConfig`. All steps (`total_steps`, `warmup_steps`, `decay_steps`)
count optimizer updates; with `accumulation_steps` = A the train step (one
micro-batch, one `tx.update` call) runs A times per update.

The update of a trainable parameter is computed by this chain, in order:
global-norm clipping of the gradient, weight decay (coupled L2 added to the
gradient for sgd and adam; decoupled, after the Adam scaling, for adamw),
momentum or Adam scaling, multiplication by -learning_rate(update), and the
per-regex learning-rate multiplier. Frozen parameters get an update of exactly
zero and no optimizer state (no moments, no accumulated gradients). `tx.update`
must be given the parameters. `tx.init(params)` raises a ValueError naming the
regex and its field if a regex of `frozen_params`, `lr_mults` or (with weight
decay) `weight_decay_params` / `weight_decay_exclude` matches no parameter.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import optax

from moe.config import schema
from moe.config import param_names

OPTIMIZER_NAMES = ("sgd", "adam", "adamw")
SCHEDULE_NAMES = ("warmup_cosine", "warmup_linear", "warmup_rsqrt", "constant")
_TRAINABLE = "trainable"
_FROZEN = "frozen"


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """Learning-rate schedule, `config.optimizer.schedule`.

  The learning rate rises linearly from 0 at update 0 to the peak
  `config.optimizer.learning_rate` at update `warmup_steps`, then follows
  `name` as a function of t = update - warmup_steps:

    constant:      peak
    warmup_cosine: end + (peak - end) * (1 + cos(pi * t / T)) / 2, T =
                   decay_steps - warmup_steps; `end_value` after decay_steps.
    warmup_linear: end + (peak - end) * (1 - t / T); `end_value` after.
    warmup_rsqrt:  peak * sqrt(timescale / (t + timescale)).

  Attributes:
    name: one of SCHEDULE_NAMES.
    warmup_steps: updates of linear warmup (0: start at the peak).
    decay_steps: update at which cosine or linear decay reaches `end_value`,
      warmup included; None: the run's `total_steps`.
    end_value: learning rate at and after `decay_steps` (cosine, linear).
    timescale: rsqrt time constant: the rate is peak / sqrt(2) `timescale`
      updates after warmup.
  """
  name: str = "constant"
  warmup_steps: int = 0
  decay_steps: int | None = None
  end_value: float = 0.0
  timescale: int = 10_000

  def __post_init__(self):
    field = "config.optimizer.schedule"
    schema.check_choice(self.name, f"{field}.name", SCHEDULE_NAMES)
    schema.check_int(self.warmup_steps, f"{field}.warmup_steps", 0)
    if self.decay_steps is not None:
      schema.check_int(self.decay_steps, f"{field}.decay_steps", 1)
    schema.check_number(self.end_value, f"{field}.end_value")
    schema.check_int(self.timescale, f"{field}.timescale", 1)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimizer, `config.optimizer`.

  Attributes:
    name: one of OPTIMIZER_NAMES.
    learning_rate: peak learning rate of the schedule.
    schedule: a `ScheduleConfig` (given in the config as a dict/ConfigDict).
    momentum: sgd momentum (0: plain sgd).
    nesterov: sgd with Nesterov momentum.
    b1: Adam first-moment decay (adam, adamw).
    b2: Adam second-moment decay (adam, adamw).
    eps: Adam epsilon (adam, adamw).
    weight_decay: decay coefficient (0: none). It is multiplied by the
      learning rate, like in `optax.adamw` and torch.
    weight_decay_params: regexes of the decayed parameters; default: every
      kernel, i.e. no biases, norm scales, position embeddings or class token.
    weight_decay_exclude: regexes of parameters never decayed even if they
      match `weight_decay_params` (e.g. ('head/.*',) for fine-tuning).
    grad_clip_norm: clip the gradient of the trainable parameters to this
      global norm; None: no clipping.
    frozen_params: regexes of parameters that are not trained.
    lr_mults: ordered (regex, multiplier) pairs; a parameter's learning rate
      is multiplied by the multiplier of the first regex it matches (1 if
      none).
    accumulation_steps: micro-batches whose mean gradient makes one update
      (`optax.MultiSteps`); 1: no accumulation.
  """
  name: str
  learning_rate: float
  schedule: ScheduleConfig = ScheduleConfig()
  momentum: float = 0.0
  nesterov: bool = False
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  weight_decay_params: Sequence[str] = (r"(.*/)?kernel",)
  weight_decay_exclude: Sequence[str] = ()
  grad_clip_norm: float | None = None
  frozen_params: Sequence[str] = ()
  lr_mults: Sequence[tuple[str, float]] = ()
  accumulation_steps: int = 1

  def __post_init__(self):
    field = "config.optimizer"
    schema.check_choice(self.name, f"{field}.name", OPTIMIZER_NAMES)
    schema.check_number(self.learning_rate, f"{field}.learning_rate")
    for name in ("momentum", "weight_decay", "eps"):
      schema.check_number(getattr(self, name), f"{field}.{name}")
    for name in ("b1", "b2"):
      schema.check_number(getattr(self, name), f"{field}.{name}", maximum=1.0)
    if self.grad_clip_norm is not None:
      schema.check_number(self.grad_clip_norm,
                          f"{field}.grad_clip_norm", strict=True)
    schema.check_int(self.accumulation_steps,
                     f"{field}.accumulation_steps", 1)
    for regex, multiplier in param_names.compile_rules(self.lr_mults,
                                                       f"{field}.lr_mults"):
      schema.check_number(
          multiplier, f"{field}.lr_mults multiplier of {regex.pattern!r}")

  @classmethod
  def from_config(cls, config: Any) -> "OptimizerConfig":
    """Parses `config.optimizer` (a ConfigDict, a dict or an instance)."""
    return schema.parse_section(cls, config, "config.optimizer")


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """An optax transformation and the learning-rate schedule it follows.

  Attributes:
    tx: the transformation for the train step; call `tx.update(grads, state,
      params)` once per micro-batch.
    schedule: learning rate (before `lr_mults`) as a function of the number
      of optimizer updates done.
    accumulation_steps: micro-batches (`tx.update` calls) per update.
  """
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  accumulation_steps: int = 1

  def learning_rate(self, step):
    """Learning rate of the update that the train step number `step` feeds.

    Args:
      step: number of train steps (micro-batches) done so far.

    Returns:
      The learning rate (before `lr_mults`) as a scalar array.
    """
    return self.schedule(step // self.accumulation_steps)


def create_schedule(config: ScheduleConfig, peak_value: float,
                    total_steps: int | None = None) -> optax.Schedule:
  """Returns the learning rate as a function of the optimizer update count.

  Args:
    config: the schedule config (see `ScheduleConfig` for the formulas).
    peak_value: learning rate at the end of warmup.
    total_steps: number of updates of the run, the default `decay_steps`.

  Returns:
    An optax schedule.

  Raises:
    ValueError: if a decaying schedule has neither `decay_steps` nor
      `total_steps`, or decays over no steps.
  """
  after_warmup = _schedule_after_warmup(config, peak_value, total_steps)
  if config.warmup_steps == 0:
    return after_warmup
  warmup = optax.linear_schedule(0.0, peak_value, config.warmup_steps)
  return optax.join_schedules([warmup, after_warmup], [config.warmup_steps])


def _schedule_after_warmup(config: ScheduleConfig, peak_value: float,
                           total_steps: int | None) -> optax.Schedule:
  """Returns the schedule as a function of the updates done after warmup."""
  if config.name == "constant":
    return optax.constant_schedule(peak_value)
  if config.name == "warmup_rsqrt":
    return lambda t: peak_value * jnp.sqrt(
        config.timescale / (t + config.timescale))
  decay_steps = config.decay_steps or total_steps
  if decay_steps is None:
    raise ValueError(
        f"config.optimizer.schedule.name={config.name!r} needs "
        "config.optimizer.schedule.decay_steps or the run's total_steps.")
  length = decay_steps - config.warmup_steps
  if length <= 0:
    raise ValueError(
        "config.optimizer.schedule.decay_steps (or total_steps) must exceed "
        f"warmup_steps={config.warmup_steps}, got {decay_steps}.")
  end_value = config.end_value

  def decay(t):
    fraction = jnp.clip(t / length, 0.0, 1.0)
    if config.name == "warmup_cosine":
      remaining = 0.5 * (1.0 + jnp.cos(jnp.pi * fraction))
    else:
      remaining = 1.0 - fraction
    return end_value + (peak_value - end_value) * remaining

  return decay


def create_optimizer(config: Any, total_steps: int | None = None) -> Optimizer:
  """Builds the optimizer described by `config.optimizer`.

  Args:
    config: `config.optimizer`, a ConfigDict or dict with the fields of
      `OptimizerConfig` (or an `OptimizerConfig`).
    total_steps: number of optimizer updates of the run; the end of cosine
      and linear decay unless `schedule.decay_steps` is set.

  Returns:
    An `Optimizer`.

  Raises:
    ValueError: for an unknown name, field or value, naming the field.
  """
  config = OptimizerConfig.from_config(config)
  schedule = create_schedule(config.schedule, config.learning_rate,
                             total_steps)
  tx = _trainable_chain(config, schedule)
  if config.accumulation_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.accumulation_steps)
    tx = tx.gradient_transformation()
  if config.frozen_params:
    tx = optax.multi_transform(
        {_TRAINABLE: tx, _FROZEN: optax.set_to_zero()},
        _frozen_labels_fn(config.frozen_params))
  tx = checking_param_regexes(tx, _param_regexes(config))
  return Optimizer(tx=tx, schedule=schedule,
                   accumulation_steps=config.accumulation_steps)


def _trainable_chain(config: OptimizerConfig,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """Returns the chain that computes the updates of trainable parameters."""
  transforms = []
  if config.grad_clip_norm is not None:
    transforms.append(optax.clip_by_global_norm(config.grad_clip_norm))
  decay = None
  if config.weight_decay > 0:
    decay = optax.add_decayed_weights(
        config.weight_decay,
        mask=weight_decay_mask_fn(config.weight_decay_params,
                                  config.weight_decay_exclude))
  if decay is not None and config.name != "adamw":
    transforms.append(decay)
  if config.name == "sgd":
    if config.momentum > 0:
      transforms.append(optax.trace(decay=config.momentum,
                                    nesterov=config.nesterov))
  else:
    transforms.append(optax.scale_by_adam(b1=config.b1, b2=config.b2,
                                          eps=config.eps))
  if decay is not None and config.name == "adamw":
    transforms.append(decay)
  transforms.append(optax.scale_by_learning_rate(schedule))
  if config.lr_mults:
    transforms.append(scale_by_regex_multipliers(config.lr_mults,
                                                 "config.optimizer.lr_mults"))
  return optax.chain(*transforms)


def weight_decay_mask_fn(
    decayed: Sequence[str],
    excluded: Sequence[str] = ()) -> Callable[[Any], Any]:
  """Returns params -> tree of bools, True where weight decay applies.

  Args:
    decayed: regexes of the decayed parameters.
    excluded: regexes of parameters never decayed.

  Returns:
    A mask function for `optax.add_decayed_weights`.
  """
  decayed_patterns = param_names.compile_regexes(
      decayed, "config.optimizer.weight_decay_params")
  excluded_patterns = param_names.compile_regexes(
      excluded, "config.optimizer.weight_decay_exclude")

  def is_decayed(name: str, _) -> bool:
    return (param_names.matches_any(decayed_patterns, name)
            and not param_names.matches_any(excluded_patterns, name))

  return lambda params: param_names.map_with_names(is_decayed, params)


def _frozen_labels_fn(frozen: Sequence[str]) -> Callable[[Any], Any]:
  """Returns params -> tree of 'frozen' or 'trainable' labels."""
  patterns = param_names.compile_regexes(frozen,
                                         "config.optimizer.frozen_params")
  return lambda params: param_names.map_with_names(
      lambda name, _: (_FROZEN if param_names.matches_any(patterns, name)
                       else _TRAINABLE), params)


def _param_regexes(config: OptimizerConfig) -> dict[str, Sequence[str]]:
  """The regexes of `config` that must each select a parameter, by field."""
  field = "config.optimizer"
  regexes = {f"{field}.frozen_params": config.frozen_params}
  if config.weight_decay > 0:
    regexes[f"{field}.weight_decay_params"] = config.weight_decay_params
    regexes[f"{field}.weight_decay_exclude"] = config.weight_decay_exclude
  return regexes


def checking_param_regexes(
    tx: optax.GradientTransformation,
    regexes: Mapping[str, Sequence[str]]) -> optax.GradientTransformation:
  """Returns `tx` whose `init` first checks regexes against the params.

  Args:
    tx: the transformation; its state and updates are unchanged.
    regexes: config field -> regexes over parameter names.

  Returns:
    `tx` with an `init(params)` that raises a ValueError naming the regex
    and the field if a regex matches no parameter.
  """

  def init_fn(params):
    names = [name for name, _ in param_names.named_leaves(params)]
    for field, field_regexes in regexes.items():
      param_names.check_every_pattern_matches(
          param_names.compile_regexes(field_regexes, field), names, field)
    return tx.init(params)

  return optax.GradientTransformation(init_fn, tx.update)


def scale_by_regex_multipliers(
    rules: Sequence[tuple[str, float]],
    field: str = "lr_mults") -> optax.GradientTransformation:
  """Multiplies each update by the multiplier of the first regex it matches.

  Updates whose name matches no regex are left unchanged (bitwise).

  Args:
    rules: ordered (regex, multiplier) pairs over parameter names.
    field: config field of the rules, quoted in errors.

  Returns:
    A stateless optax transformation. Its `init` raises a ValueError if a
    regex matches no (trainable) parameter.
  """
  compiled = param_names.compile_rules(rules, field)

  def scale(name, update):
    rule = param_names.first_matching_rule(compiled, name)
    if rule is None:
      return update
    return update * jnp.asarray(rule[1], update.dtype)

  def init_fn(params):
    names = [name for name, _ in param_names.named_leaves(params)]
    param_names.check_every_pattern_matches(
        [pattern for pattern, _ in compiled], names, field,
        what="trainable parameter")
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return param_names.map_with_names(scale, updates), state

  return optax.GradientTransformation(init_fn, update_fn)
