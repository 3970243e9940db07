"""Building blocks of the experiment configs in `configs/`.

Config files are loaded by path (`--config configs/x.py[:arg]`), so the
pieces they share live here, inside the installed package:

  arg = recipes.parse_arg(arg, runlocal=False, experts=8)
  config = recipes.base_config()             # every field, at defaults
  config.model = recipes.vit_model("S/32", num_classes=1000,
                                   moe=recipes.moe_config(8, 2))
  config.mesh.partition_rules = recipes.EXPERT_PARTITION_RULES

`base_config` holds every field the trainer reads, so that each can be
overridden from the command line (`--config.a.b=value`) although the config
is locked. The sections built here take their defaults from the classes that
read them (the routers, `MoeMlpBlock`, `VisionTransformer`, `Encoder`), so
a default is written once, in the class.
"""
from __future__ import annotations

import ast
import typing
from typing import Any, Callable

import ml_collections

from moe.config import experiment
from moe.config import schema
from moe.data import addition
from moe.nn import attention
from moe.nn import decoder
from moe.nn import moe_layer
from moe.nn import routers
from moe.nn import transformer
from moe.nn import vit
from moe.parallel import partitioning
from moe.train import losses
from moe.train import tasks

# Shards the leading E axis of every expert parameter of a V-MoE over the
# mesh's 'expert' axis (`moe.parallel.partitioning`).
EXPERT_PARTITION_RULES = ((".*/Experts/.*", (partitioning.EXPERT_AXIS,)),)
_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config argument such as 'runlocal,experts=4'.

  Args:
    arg: comma-separated `key=value` items; a bare `key` means `key=True`.
      None or '' keeps every default.
    **defaults: the allowed keys and their defaults; a value is converted to
      the type of its default (bool: 1/0, true/false, yes/no).

  Returns:
    A ConfigDict with every key of `defaults`.

  Raises:
    ValueError: for a key that is not in `defaults` or a value that does not
      convert.
  """
  values = dict(defaults)
  for item in filter(None, (part.strip() for part in (arg or "").split(","))):
    key, has_value, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r} in {arg!r}; allowed: "
                       f"{', '.join(sorted(defaults))}.")
    values[key] = _convert(key, text.strip() if has_value else "true",
                           defaults[key])
  return ml_collections.ConfigDict(values)


def _convert(key: str, text: str, default: Any) -> Any:
  """Converts `text` to the type of `default`."""
  try:
    if isinstance(default, bool):
      if text.lower() not in _TRUE + _FALSE:
        raise ValueError(f"expected one of {_TRUE + _FALSE}")
      return text.lower() in _TRUE
    if isinstance(default, (int, float)):
      return type(default)(ast.literal_eval(text))
    if default is None:
      return ast.literal_eval(text)
    return type(default)(text)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f"Config argument {key}={text!r} is not a "
                     f"{type(default).__name__}: {e}") from e


def router_config(name: str | None = None,
                  **fields: Any) -> ml_collections.ConfigDict:
  """Returns a `model.encoder.moe.router` section with every router's fields.

  A field takes the default of the router classes that have it; where they
  differ (`noise_std`: 1.0 for NoisyTopExpertsPerItem, 0.0 for SparseTopK),
  it is a typed placeholder, None, which means "the chosen router's own
  default" (`moe.nn.routers.create_router`). Changing `name` alone thus gives
  that router exactly as its class defines it, and every field can still be
  overridden on the command line.

  Args:
    name: a key of `moe.nn.routers.ROUTERS`; None: the default router of
      `moe.nn.moe_layer.MoeMlpBlock` (SparseTopK).
    **fields: router attributes to set, e.g. `capacity_factor=1.25`.

  Returns:
    The section.
  """
  name = moe_layer.MoeMlpBlock.router["name"] if name is None else name
  routers.get_router(name)
  settable = routers.config_fields()
  schema.check_unknown_fields(fields, settable,
                              "config.model.encoder.moe.router")
  defaults, hints = {}, {}
  for cls in routers.ROUTERS.values():
    hints.update(typing.get_type_hints(cls))
    for field, default in schema.field_defaults(cls).items():
      if field in settable and defaults.setdefault(field, default) != default:
        defaults[field] = None
  router = schema.as_section({"name": name, **defaults},
                             {"name": str, **hints})
  router.update(fields)
  return router


def moe_config(num_experts: int, num_selected_experts: int, *,
               layers: Any = "every_2",
               router: ml_collections.ConfigDict | None = None,
               **fields: Any) -> ml_collections.ConfigDict:
  """Returns a `model.encoder.moe` section (see `moe.nn.vit`).

  Fields not given take the defaults of `moe.nn.moe_layer.MoeMlpBlock`,
  except the mesh axes: groups are split like the batch and experts over
  'expert' (`partitioning.MOE_GROUP_AXES`, `MOE_EXPERT_AXES`), which makes
  the layer expert parallel whenever `config.mesh.expert` > 1.

  Args:
    num_experts: E.
    num_selected_experts: K.
    layers: the MoE blocks: "every_2", "last_2" or block indices.
    router: `router_config(...)`; default `router_config()`.
    **fields: other `MoeMlpBlock` attributes: `group_size` (S tokens per
      routing group; None: one image's tokens), `dispatcher` ("einsum",
      "index" or "ragged"), `dtype` of the expert computation,
      `group_axes`, `expert_axes`.

  Returns:
    The section.
  """
  schema.check_unknown_fields(fields, moe_layer.MOE_CONFIG_FIELDS,
                              "config.model.encoder.moe")
  moe = schema.section_defaults(moe_layer.MoeMlpBlock,
                                exclude=moe_layer.ENCODER_FIELDS,
                                layers=layers)
  moe.update(dict(num_experts=num_experts,
                  num_selected_experts=num_selected_experts,
                  router=router or router_config(),
                  group_axes=partitioning.MOE_GROUP_AXES,
                  expert_axes=partitioning.MOE_EXPERT_AXES, **fields))
  return moe


def vit_model(variant: str, num_classes: int, *,
              moe: ml_collections.ConfigDict | None = None,
              **fields: Any) -> ml_collections.ConfigDict:
  """Returns a `model` section: ViT, or V-MoE when `moe` is given.

  Fields not given take the defaults of `moe.nn.vit.VisionTransformer` and
  `moe.nn.transformer.Encoder`; the variant sets the sizes.

  Args:
    variant: "<size>/<patch>", e.g. "S/32" (see `moe.nn.vit.VARIANTS`).
    num_classes: number of classes.
    moe: `moe_config(...)`, or None for a dense ViT.
    **fields: other model fields (`hidden_size`, `classifier`,
      `representation_size`, `head_zeroinit`) and `encoder` fields
      (`num_layers`, `mlp_dim`, `num_heads`, `dropout_rate`,
      `attention_dropout_rate`, `stochastic_depth`).

  Returns:
    The section.
  """
  sized = ("num_layers", "mlp_dim", "num_heads")
  encoder = schema.section_defaults(transformer.Encoder,
                                    exclude=sized + ("moe",))
  encoder.update({k: v for k, v in fields.items()
                  if k in schema.field_names(transformer.Encoder)})
  encoder.moe = moe
  model = schema.section_defaults(
      vit.VisionTransformer,
      exclude=("num_classes", "patch_size", "hidden_size", "encoder"),
      name="vit", variant=variant, num_classes=num_classes)
  model.update({k: v for k, v in fields.items()
                if k not in schema.field_names(transformer.Encoder)})
  model.encoder = encoder
  return model


def base_config() -> ml_collections.ConfigDict:
  """Returns an experiment config with every field at its default.

  See `moe.config.experiment.base_config`: the caller sets `total_steps`,
  `model`, the dataset and `optimizer.name` / `optimizer.learning_rate`.
  """
  return experiment.base_config()


def digits_config(moe: ml_collections.ConfigDict | None = None, *,
                  runlocal: bool = False) -> ml_collections.ConfigDict:
  """Returns the experiment on the embedded digits (`configs/digits_*.py`).

  A small ViT on 8x8x1 images with 2x2 patches (16 patches + class token =
  17 tokens), D=64, 4 blocks, MLP width 128, 4 heads; Adam with warmup and
  cosine decay, 1000 steps of 128 images (89 epochs), evaluation on the 360
  test images every 200 steps; checkpoints every 200 steps, the last 2 and
  the best by eval accuracy kept.

  Args:
    moe: `moe_config(...)` to make it a V-MoE (experts sharded over the
      mesh's 'expert' axis); None: the dense ViT.
    runlocal: a 2-block D=32 model for 20 steps of 64 images (smoke tests).

  Returns:
    The experiment config.
  """
  config = base_config()
  config.total_steps = 1000
  config.dataset.batch_size = 128
  config.dataset.eval_batch_size = 360
  config.model = vit_model("tiny/2", num_classes=10, hidden_size=64,
                           num_layers=4, mlp_dim=128, num_heads=4, moe=moe)
  if moe is not None:
    config.mesh.partition_rules = EXPERT_PARTITION_RULES
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.grad_clip_norm = 1.0
  config.optimizer.schedule.name = "warmup_cosine"
  config.optimizer.schedule.warmup_steps = 50
  config.evaluation.every_steps = 200
  config.checkpoint.every_steps = 200
  config.checkpoint.keep = 2
  config.checkpoint.best_metric = "eval_accuracy"
  config.logging.every_steps = 50
  config.logging.progress_every_secs = 10.0
  if runlocal:
    config.total_steps = 20
    config.dataset.batch_size = 64
    config.dataset.eval_batch_size = 120
    config.model.hidden_size = 32
    config.model.encoder.num_layers = 2
    config.model.encoder.mlp_dim = 32
    config.model.encoder.num_heads = 2
    config.optimizer.learning_rate = 1e-2
    config.optimizer.schedule.warmup_steps = 2
    config.evaluation.every_steps = 10
    config.checkpoint.every_steps = 10
    config.logging.every_steps = 5
  return config


def mnist5k_config(moe: ml_collections.ConfigDict | None = None, *,
                   runlocal: bool = False) -> ml_collections.ConfigDict:
  """Returns the experiment on the embedded mnist5k (`configs/mnist5k_*.py`).

  The model and optimisation of `digits_config` on 28x28x1 images in 4x4
  patches (49 patches + class token = 50 tokens): D=64, 4 blocks, MLP width
  128, 4 heads; 1000 steps of 128 images (32 epochs of the 4,000 train
  images), evaluation on the 1,000 test images every 200 steps (kept in
  memory after the first).

  Args:
    moe: `moe_config(...)` to make it a V-MoE; None: the dense ViT.
    runlocal: the runlocal model of `digits_config`, 20 steps (smoke tests).

  Returns:
    The experiment config.
  """
  config = digits_config(moe, runlocal=runlocal)
  config.dataset.name = "mnist5k"
  config.dataset.eval_batch_size = 200 if runlocal else 1000
  config.dataset.cache_eval = True
  config.model.variant = "tiny/4"
  return config


def small_vmoe_config(make_config: Callable[..., ml_collections.ConfigDict],
                      arg: str | None) -> ml_collections.ConfigDict:
  """Returns the small V-MoE of `configs/digits_vmoe.py` on a dataset.

  E experts (default 8), K=2 in every second block, the SparseTopK router
  with regularisation 0.1 and capacity factor 1.25.

  Args:
    make_config: the dataset's experiment, `digits_config` or
      `mnist5k_config`.
    arg: the config file's argument, comma-separated presets: `runlocal`
      (a 2-block model, 20 steps: a smoke test in seconds), `experts=E`.

  Returns:
    The experiment config.
  """
  arg = parse_arg(arg, runlocal=False, experts=8)
  router = router_config("SparseTopK", capacity_factor=1.25,
                         regularization=0.1)
  moe = moe_config(arg.experts, 2, layers="every_2", router=router)
  return make_config(moe, runlocal=arg.runlocal)


def mlp_model(num_classes: int, hidden_sizes=(300, 100)
              ) -> ml_collections.ConfigDict:
  """Returns a `config.model` section of `moe.nn.mlp` (LeNet-300-100)."""
  return ml_collections.ConfigDict(dict(
      name="mlp", num_classes=num_classes, hidden_sizes=tuple(hidden_sizes)))


def parse_pqk_arg(arg: str | None, *, sparsity: float, bits: int
                  ) -> ml_collections.ConfigDict:
  """Parses a PQK config file's argument: `runlocal`, `sparsity=S`,
  `bits=B` (weights) and `method=hard|soft`, with these defaults."""
  return parse_arg(arg, runlocal=False, sparsity=sparsity, bits=bits,
                   method="hard")


def pqk_config(config: ml_collections.ConfigDict,
               preset: ml_collections.ConfigDict, *, learning_rate: float,
               **task_fields: Any) -> ml_collections.ConfigDict:
  """Makes `config` a PQK run (`moe.train.pqk_task`), in place.

  The run's steps are split into the phases: a third dense, a third
  pruning in 4 rounds (2 for runs under 40 steps), a tenth warm-up, the
  rest mutual distillation; Adam at a constant learning rate, since every
  phase trains anew.

  Args:
    config: an experiment config with its total_steps set.
    preset: `parse_pqk_arg(...)`: sparsity, weight bits, pruning method.
    learning_rate: Adam's learning rate.
    **task_fields: other `config.task` fields that replace the defaults.

  Returns:
    `config`.
  """
  task_fields = dict(sparsity=preset.sparsity, weight_bits=preset.bits,
                     pruning_method=preset.method, **task_fields)
  total = config.total_steps
  config.task = tasks.default_task_config("pqk")
  config.task.update(dict(
      dense_steps=total // 3, prune_steps=total // 3,
      warmup_steps=total // 10, pruning_rounds=4 if total >= 40 else 2))
  schema.check_unknown_fields(task_fields, tuple(config.task), "config.task")
  config.task.update(task_fields)
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = learning_rate
  config.optimizer.schedule.name = "constant"
  config.optimizer.schedule.warmup_steps = 0
  return config


def parse_smec_arg(arg: str | None) -> ml_collections.ConfigDict:
  """Parses an SMEC config file's argument: `runlocal`,
  `method=smec|mrl`, `selector=<name>`, `memory=true|false` (S-XBM)."""
  return parse_arg(arg, runlocal=False, method="smec",
                   selector="sparse_topk", memory=False)


def smec_config(config: ml_collections.ConfigDict,
                preset: ml_collections.ConfigDict, *, backbone: str,
                stage_steps: int, learning_rate: float
                ) -> ml_collections.ConfigDict:
  """Makes `config` (the backbone's experiment) an SMEC run, in place.

  `moe.train.smec_task` on the backbone's frozen embeddings of
  `config.dataset`: the default kept sizes D/2, D/4, D/8, `stage_steps`
  steps per stage (SMRL; the MRL baseline trains as many steps in one
  stage), Adam at a constant learning rate, an evaluation and a checkpoint
  at the end of every stage.

  Args:
    config: the backbone's experiment config (its model and dataset).
    preset: `parse_smec_arg(...)`.
    backbone: the default `config.task.backbone` (a workdir).
    stage_steps: steps per stage.
    learning_rate: Adam's learning rate.

  Returns:
    `config`.
  """
  config.task = tasks.default_task_config("smec")
  config.task.update(dict(backbone=backbone, method=preset.method,
                          selector=preset.selector,
                          cross_batch_memory=preset.memory))
  config.total_steps = 3 * stage_steps
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = learning_rate
  config.optimizer.grad_clip_norm = None
  config.optimizer.schedule.name = "constant"
  config.optimizer.schedule.warmup_steps = 0
  for section in (config.evaluation, config.checkpoint):
    section.every_steps = stage_steps
  config.checkpoint.best_metric = None
  config.logging.every_steps = max(stage_steps // 4, 1)
  return config


def set_loss(config: ml_collections.ConfigDict, name: str) -> None:
  """Sets the loss and all its options at their defaults, in place.

  `config.task.loss = name` alone uses the loss's default options; with
  this, every option (`config.task.loss_options.<option>`) also exists in the
  config and can be overridden on the command line of a locked config.

  Args:
    config: the experiment config.
    name: a key of `moe.train.losses.LOSSES`, e.g. "topk_xent".
  """
  config.task.loss = name
  config.task.loss_options = ml_collections.ConfigDict(
      losses.default_loss_options(name))


def labels_pp(num_classes: int) -> str:
  """Returns the end of a classification preprocessing string.

  Pixels from [0, 255] to [-1, 1], one-hot `labels` of `num_classes`, and
  only the `image` and `labels` features kept.
  """
  return (f"value_range(-1, 1)|onehot({num_classes}, key_result='labels')"
          f"|keep('image', 'labels')")


def imagenet_pp(num_classes: int, image_size: int = 224) -> tuple[str, str]:
  """Returns the (train, eval) preprocessing of the V-MoE ImageNet recipes.

  Train: Inception crop, horizontal flip; eval: resize to 8/7 of the size and
  central crop. Pixels in [-1, 1], one-hot `labels`. The paper also uses
  RandAugment and mixup, which `moe.data` does not provide.

  Args:
    num_classes: number of classes of the one-hot labels.
    image_size: side of the square model input.

  Returns:
    The two preprocessing strings.
  """
  common = labels_pp(num_classes)
  train = f"decode_jpeg_and_inception_crop({image_size})|flip_lr|{common}"
  evaluation = (f"decode|resize({image_size * 8 // 7})|"
                f"central_crop({image_size})|{common}")
  return train, evaluation


def vmoe_recipe(config: ml_collections.ConfigDict, *, learning_rate: float,
                total_steps: int, warmup_steps: int = 10_000) -> None:
  """Sets the optimisation of the V-MoE paper's upstream runs, in place.

  AdamW (b1 0.9, b2 0.999) with decoupled weight decay 0.1 on the kernels,
  linear warmup then linear decay to 1e-5, gradient clipping at global norm
  1, sigmoid cross-entropy, router auxiliary losses weighted 0.005.

  Args:
    config: the experiment config.
    learning_rate: peak learning rate.
    total_steps: train steps.
    warmup_steps: linear warmup steps.
  """
  config.total_steps = total_steps
  config.task.loss = "sigmoid_xent"
  config.task.aux_loss_weight = 0.005
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = learning_rate
  config.optimizer.weight_decay = 0.1
  config.optimizer.grad_clip_norm = 1.0
  config.optimizer.schedule.name = "warmup_linear"
  config.optimizer.schedule.warmup_steps = warmup_steps
  config.optimizer.schedule.end_value = 1e-5


def decoder_model(vocab_size: int, **fields: Any) -> ml_collections.ConfigDict:
  """Returns a `model` section of the causal decoder (`moe.nn.decoder`).

  Every field is present at the default of `moe.nn.decoder.Decoder`,
  `moe.nn.transformer.Encoder` (`encoder`, with `DEFAULT_ENCODER`'s sizes:
  4 blocks, MLP 512, 4 heads) and `moe.nn.attention.SelfAttention`
  (`attention`: sparsity "dense", keys_per_query, regularization, p and the
  gate fields; causal is always on), so that each can be overridden on the
  command line, e.g. `--config.model.attention.sparsity=sparse_topk`.

  Args:
    vocab_size: V.
    **fields: `hidden_size` and `encoder` fields (`num_layers`, `mlp_dim`,
      `num_heads`, `dropout_rate`, ...).

  Returns:
    The section.
  """
  encoder_fields = {k: v for k, v in fields.items()
                    if k in decoder.ENCODER_FIELDS}
  schema.check_unknown_fields(
      set(fields) - set(encoder_fields), ("hidden_size",), "config.model")
  encoder = schema.section_defaults(
      transformer.Encoder, exclude=tuple(decoder.DEFAULT_ENCODER) + (
          "moe", "attention"), **decoder.DEFAULT_ENCODER)
  encoder.moe = None
  encoder.update(encoder_fields)
  model = schema.section_defaults(
      decoder.Decoder, exclude=("vocab_size", "encoder", "attention"),
      name="decoder", vocab_size=vocab_size)
  model.update({k: v for k, v in fields.items() if k == "hidden_size"})
  model.encoder = encoder
  model.attention = schema.section_defaults(
      attention.SelfAttention, exclude=attention.ENCODER_FIELDS + (
          "causal", "kernel_init", "dtype"))
  return model


def addition_config(*, runlocal: bool = False) -> ml_collections.ConfigDict:
  """Returns the addition experiment (`configs/addition.py`).

  The causal decoder (D=128, 4 blocks, MLP 512, 4 heads, dense attention)
  on `moe.data.addition` (8,000 train pairs, 2,000 held out, split seed
  0), the task `moe.train.sequence_task` ("addition"); 800 steps of 256
  rows, AdamW 1e-3 (weight decay 0.1, clipping at norm 1) with 100 warmup
  steps and cosine decay. Evaluation on the held-out pairs every 200 steps
  and at the end; checkpoints every 200 steps, the last 2 and the best by
  exact match kept.

  Args:
    runlocal: a 2-block D=32 model for 20 steps of 64 rows (smoke tests).

  Returns:
    The experiment config.
  """
  config = base_config()
  config.task = tasks.default_task_config("addition")
  config.dataset.name = "addition"
  config.dataset.pp_train = config.dataset.pp_eval = ""
  config.dataset.batch_size = 256
  config.dataset.eval_batch_size = 1000
  config.model = decoder_model(addition.VOCAB_SIZE)
  config.total_steps = 800
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.1
  config.optimizer.grad_clip_norm = 1.0
  config.optimizer.schedule.name = "warmup_cosine"
  config.optimizer.schedule.warmup_steps = 100
  for section in (config.evaluation, config.checkpoint):
    section.every_steps = 200
  config.checkpoint.keep = 2
  config.checkpoint.best_metric = "eval_exact_match"
  config.logging.every_steps = 100
  config.logging.progress_every_secs = 10.0
  if runlocal:
    config.total_steps = 20
    config.dataset.batch_size = 64
    config.dataset.eval_batch_size = 1000
    config.model.hidden_size = 32
    config.model.encoder.update(dict(num_layers=2, mlp_dim=64, num_heads=2))
    config.optimizer.learning_rate = 3e-3
    config.optimizer.schedule.warmup_steps = 2
    for section in (config.evaluation, config.checkpoint):
      section.every_steps = 10
    config.logging.every_steps = 5
  return config


def parse_sparse_attention_arg(arg: str | None) -> ml_collections.ConfigDict:
  """Parses `configs/addition_sparse.py`'s argument: `runlocal`,
  `sparsity=gated|sparse_topk|hard_topk|dense`, `k=<keys per query>`."""
  return parse_arg(arg, runlocal=False, sparsity="gated", k=4)


GATE_PARAMS = ".*/gate_(scale|bias)"


def sparse_attention_config(config: ml_collections.ConfigDict,
                            preset: ml_collections.ConfigDict, *, base: str,
                            steps: int, learning_rate: float,
                            gate_lr_mult: float
                            ) -> ml_collections.ConfigDict:
  """Makes `config` (the base addition run) a sparse attention
  post-training run of that base, in place.

  `moe.train.sparse_attention_task` from the base run's checkpoint
  (`config.init_from.checkpoint`, gates and GECO state fresh) with the
  attention sparsity and keys per query of `preset`; Adam at a constant
  learning rate, the gate parameters' `gate_lr_mult` times larger (they
  start at the base model's "all open" and must travel to closing edges);
  an evaluation every tenth of the run, checkpoints as often.

  Args:
    config: the base experiment (`addition_config`).
    preset: `parse_sparse_attention_arg(...)`.
    base: the default `config.init_from.checkpoint` (the base workdir).
    steps: post-training steps.
    learning_rate: Adam's learning rate.
    gate_lr_mult: learning-rate multiplier of the gate parameters.

  Returns:
    `config`.
  """
  split = {name: config.task[name] for name in ("split_seed",
                                                "test_fraction")}
  config.task = tasks.default_task_config("sparse_attention")
  config.task.update(split)
  config.model.attention.sparsity = preset.sparsity
  config.model.attention.keys_per_query = preset.k
  config.init_from.checkpoint = base
  config.init_from.reinit = ((GATE_PARAMS, "geco/.*")
                             if preset.sparsity == "gated" else ("geco/.*",))
  config.total_steps = steps
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = learning_rate
  config.optimizer.weight_decay = 0.0
  config.optimizer.schedule.name = "constant"
  config.optimizer.schedule.warmup_steps = 0
  if preset.sparsity == "gated":
    config.optimizer.lr_mults = ((GATE_PARAMS, gate_lr_mult),)
  for section in (config.evaluation, config.checkpoint):
    section.every_steps = max(steps // 10, 1)
  config.checkpoint.best_metric = None
  config.logging.every_steps = max(steps // 20, 1)
  return config


def make_runlocal(config: ml_collections.ConfigDict) -> None:
  """Shrinks a full-scale config to a few steps of a tiny model, in place.

  For a smoke test on one host (a laptop CPU included) of the data pipeline
  and the whole loop; the dataset must still be prepared in the data dir.
  Evaluation uses the first 64 examples of the eval split's base split.

  Args:
    config: the experiment config.
  """
  config.total_steps = 10
  config.dataset.batch_size = 16
  config.dataset.eval_batch_size = 16
  base_split = config.dataset.eval_split.split("[")[0]
  config.dataset.eval_split = f"{base_split}[:64]"
  config.dataset.shuffle_buffer = 1_000
  config.model.hidden_size = 32
  config.model.encoder.num_layers = 2
  config.model.encoder.mlp_dim = 64
  config.model.encoder.num_heads = 2
  moe = config.model.encoder.moe
  if moe is not None:
    # The last of the 2 blocks, in the field's type (ConfigDicts are typed).
    moe.layers = "last_1" if isinstance(moe.layers, str) else (1,)
    moe.group_size = None
  config.optimizer.schedule.warmup_steps = 2
  config.mesh.expert = 1
  config.evaluation.every_steps = 5
  config.checkpoint.every_steps = 5
  config.logging.every_steps = 1
