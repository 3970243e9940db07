"""Tests of the experiment configs (configs/) and moe.config.recipes."""
import os

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.nn import models
from moe.nn import transformer
from moe.config import experiment
from moe.config import recipes
from moe.train import losses
from moe.train import tasks
import train_testing

CONFIGS = sorted(name for name in os.listdir(train_testing.CONFIGS)
                 if name.endswith(".py"))
FULL_SCALE = {
    # config: ((D, blocks, MLP, heads), classes, E, K, MoE blocks, image size)
    "ilsvrc2012_vmoe_s32.py": ((512, 8, 2048, 8), 1000, 8, 2, (5, 7), 224),
    "imagenet21k_vmoe_b32.py": ((768, 12, 3072, 12), 21_843, 8, 2,
                                (1, 3, 5, 7, 9, 11), 224),
    "cifar10_vmoe_s.py": ((512, 8, 2048, 8), 10, 8, 2, (1, 3, 5, 7), 32),
}


def _num_params(model, image_size, channels=3):
  images = jax.ShapeDtypeStruct((2, image_size, image_size, channels),
                                jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
  return sum(x.size for x in jax.tree.leaves(params)), params


FINE_TUNING = ("digits_ft_vmoe.py", "cifar100_ft_vit_b16.py")
PQK = ("mnist5k_pqk_mlp.py", "digits_pqk_vit.py")
SEQUENCE = ("addition.py", "addition_sparse.py")


def test_every_config_is_tested():
  assert set(CONFIGS) == set(FULL_SCALE) | {
      "digits_vit.py", "digits_vmoe.py", "mnist5k_vit.py", "mnist5k_vmoe.py",
      *FINE_TUNING, *PQK, "mnist5k_smec.py", *SEQUENCE}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", ["", ":runlocal"])
def test_configs_load_by_path_and_build(name, arg):
  config = train_testing.load_config(name + arg)
  assert config.is_locked
  assert set(config) == set(experiment.CONFIG_FIELDS)
  experiment.ExperimentConfig.from_config(config)
  model = models.build_model(config.model)
  outputs = "vocab_size" if name in SEQUENCE else "num_classes"
  assert getattr(model, outputs) == config.model[outputs]


@pytest.mark.parametrize("name", sorted(FULL_SCALE))
def test_full_scale_configs_follow_the_vmoe_paper(name):
  (width, depth, mlp_dim, heads), classes, experts, k, blocks, size = (
      FULL_SCALE[name])
  config = train_testing.load_config(name)
  model = models.build_model(config.model)
  moe = model.encoder["moe"]
  assert (model.hidden_size, model.encoder["num_layers"],
          model.encoder["mlp_dim"], model.encoder["num_heads"]) == (
              width, depth, mlp_dim, heads)
  assert (model.num_classes, moe["num_experts"],
          moe["num_selected_experts"]) == (classes, experts, k)
  assert transformer.moe_layer_indices(moe["layers"], depth) == blocks
  assert config.mesh.expert == experts
  assert config.mesh.partition_rules == recipes.EXPERT_PARTITION_RULES
  tokens = (size // model.patch_shape[0]) ** 2 + 1
  assert moe["group_size"] == 8 * tokens
  docstring = open(os.path.join(train_testing.CONFIGS, name)).read()
  for expected in ("python -m moe.main --config configs/" + name,
                   "Expected", "TPU", "runlocal"):
    assert expected in docstring, expected


@pytest.mark.parametrize(
    "name", ["digits_vmoe.py", "digits_vit.py", "digits_ft_vmoe.py",
             "mnist5k_vmoe.py", "mnist5k_vit.py", *PQK])
def test_digits_configs_document_command_and_result(name):
  docstring = open(os.path.join(train_testing.CONFIGS, name)).read()
  assert f"python -m moe.main --config configs/{name}" in docstring
  assert "eval_accuracy=" in docstring


@pytest.mark.parametrize("dataset", ["digits", "mnist5k"])
def test_vmoe_and_vit_differ_only_in_the_moe(dataset):
  vmoe = train_testing.load_config(f"{dataset}_vmoe.py").to_dict()
  vit = train_testing.load_config(f"{dataset}_vit.py").to_dict()
  moe = vmoe["model"]["encoder"].pop("moe")
  assert vit["model"]["encoder"].pop("moe") is None
  assert vmoe["mesh"].pop("partition_rules") == recipes.EXPERT_PARTITION_RULES
  assert vit["mesh"].pop("partition_rules") == ()
  assert vmoe == vit
  assert (moe["num_experts"], moe["num_selected_experts"], moe["layers"],
          moe["router"]["name"]) == (8, 2, "every_2", "SparseTopK")


def test_loss_preset_makes_every_loss_option_an_override():
  config = train_testing.load_config(
      "digits_ft_vmoe.py:loss=topk_xent,runlocal",
      "--config.task.loss_options.p=2.0",
      "--config.task.loss_options.topk_weights=(0.25, 0.75)")
  task = tasks.create_task(config)
  assert task.loss == "topk_xent"
  assert dict(task.loss_options) == {
      "topk_weights": (0.25, 0.75), "regularization": 1.0, "p": 2.0,
      "epsilon": 1e-7}
  logits = jnp.array([[2.0, 1.0, -1.0]])
  labels = jnp.array([[0.0, 1.0, 0.0]])
  np.testing.assert_allclose(
      task.loss_fn(logits, labels),
      losses.topk_xent(logits, labels, topk_weights=(0.25, 0.75), p=2.0))
  with pytest.raises(flags.Error, match="loss must be one of .* got 'hinge'"):
    train_testing.load_config("digits_ft_vmoe.py:loss=hinge")


def test_router_is_one_override_and_presets_parse():
  config = train_testing.load_config(
      "digits_vmoe.py:experts=4,runlocal",
      "--config.model.encoder.moe.router.name=NoisyTopExpertsPerItem")
  assert config.total_steps == 20
  model = models.build_model(config.model)
  assert model.encoder["moe"]["num_experts"] == 4
  count, params = _num_params(model, 8, channels=1)
  assert count > 0
  router = params["Transformer"]["encoderblock_1"]["MoeBlock_3"]["Router"]
  assert router["dense"]["kernel"].shape == (32, 4)


def test_override_typo_is_an_error_naming_the_field():
  with pytest.raises(AttributeError,
                     match=r'Did you mean "learning_rate" instead of '
                     r'"learning_rat"\?'):
    train_testing.load_config("digits_vmoe.py",
                              "--config.optimizer.learning_rat=0.1")


def test_override_type_mismatch_is_an_error():
  with pytest.raises(flags.Error, match=r"total_steps"):
    train_testing.load_config("digits_vmoe.py", "--config.total_steps=many")


@pytest.mark.parametrize("arg, message", [
    ("runlocall", r"Unknown config argument 'runlocall' in 'runlocall'; "
     r"allowed: experts, runlocal"),
    ("experts=four", r"Config argument experts='four' is not a int"),
    ("runlocal=maybe", r"Config argument runlocal='maybe' is not a bool"),
])
def test_bad_config_arguments_are_errors(arg, message):
  with pytest.raises(flags.Error, match=message):
    train_testing.load_config(f"digits_vmoe.py:{arg}")


def test_parse_arg_converts_to_the_default_types():
  arg = recipes.parse_arg("runlocal, experts=4,lr=0.5,name=x,off=0",
                          runlocal=False, experts=8, lr=1.0, name="y",
                          off=True)
  assert arg.to_dict() == dict(runlocal=True, experts=4, lr=0.5, name="x",
                               off=False)
  assert recipes.parse_arg(None, a=1).to_dict() == {"a": 1}


def test_imagenet_pp_and_runlocal():
  train, evaluation = recipes.imagenet_pp(1000, 224)
  assert train.startswith("decode_jpeg_and_inception_crop(224)|flip_lr|")
  assert evaluation.startswith("decode|resize(256)|central_crop(224)|")
  config = train_testing.load_config("imagenet21k_vmoe_b32.py:runlocal")
  assert config.dataset.eval_split == "full[:64]"
  assert (config.total_steps, config.mesh.expert) == (10, 1)


def test_fine_tuning_configs_start_from_a_checkpoint():
  digits = train_testing.load_config("digits_ft_vmoe.py")
  assert digits.init_from.checkpoint == "/tmp/digits_vit"
  assert digits.model.encoder.moe.router.name == "SparseTopK"
  vmoe = train_testing.load_config("digits_vmoe.py")
  assert digits.model.encoder.moe.num_experts == (
      vmoe.model.encoder.moe.num_experts)
  docstring = open(os.path.join(train_testing.CONFIGS,
                                "digits_ft_vmoe.py")).read()
  assert docstring.index("--config configs/digits_vit.py") < docstring.index(
      "--config configs/digits_ft_vmoe.py")

  cifar = train_testing.load_config("cifar100_ft_vit_b16.py")
  model = models.build_model(cifar.model)
  assert (model.hidden_size, model.patch_shape, model.num_classes,
          model.encoder["moe"]) == (768, (16, 16), 100, None)
  assert cifar.init_from.checkpoint.endswith("ViT-B_16.npz")
  assert (cifar.optimizer.name, cifar.optimizer.momentum,
          cifar.optimizer.grad_clip_norm, cifar.optimizer.weight_decay) == (
              "sgd", 0.9, 1.0, 0.0)
  accumulation = cifar.optimizer.accumulation_steps
  assert cifar.dataset.batch_size * accumulation == 512
  assert cifar.total_steps // accumulation == 10_000
  assert "random_crop(384)" in cifar.dataset.pp_train
  docstring = open(os.path.join(train_testing.CONFIGS,
                                "cifar100_ft_vit_b16.py")).read()
  for expected in ("python -m moe.main --config configs/cifar100_ft_vit_b16.py",
                   "Expected", "TPU", "runlocal"):
    assert expected in docstring, expected
  assert train_testing.load_config(
      "cifar100_ft_vit_b16.py:runlocal").init_from.checkpoint is None


def test_mnist5k_is_the_digits_model_on_50_tokens():
  mnist = train_testing.load_config("mnist5k_vmoe.py")
  digits = train_testing.load_config("digits_vmoe.py")
  assert mnist.dataset.name == "mnist5k"
  assert mnist.model.variant == "tiny/4"
  model = models.build_model(mnist.model)
  assert model.patch_shape == (4, 4)
  assert mnist.model.encoder.to_dict() == digits.model.encoder.to_dict()
  assert mnist.optimizer.to_dict() == digits.optimizer.to_dict()


@pytest.mark.parametrize("name", PQK)
def test_pqk_configs_fit_their_phases_and_presets(name):
  config = train_testing.load_config(name + ":sparsity=0.5,bits=4,method=soft")
  task = tasks.create_task(config)
  assert (task.sparsity, task.weight_bits, task.pruning_method) == (
      0.5, 4, "soft")
  prune, warmup, mutual = task.schedule.boundaries
  assert 0 < prune < warmup < mutual < config.total_steps
  assert config.optimizer.schedule.name == "constant"


def test_addition_config_documents_its_run_and_trains_the_decoder():
  docstring = open(os.path.join(train_testing.CONFIGS, "addition.py")).read()
  assert "python -m moe.main --config configs/addition.py" in docstring
  assert "final: step=" in docstring and "eval_exact_match=" in docstring
  config = train_testing.load_config("addition.py")
  task = tasks.create_task(config)
  assert (config.task.name, config.dataset.name) == ("addition", "addition")
  assert (task.model.hidden_size, dict(task.model.encoder)) == (
      128, {"num_layers": 4, "mlp_dim": 512, "num_heads": 4,
            "dropout_rate": 0.0, "attention_dropout_rate": 0.0,
            "stochastic_depth": 0.0, "moe": None})
  assert task.model.attention["sparsity"] == "dense"
  switched = train_testing.load_config(
      "addition.py", "--config.model.attention.sparsity=sparse_topk")
  assert tasks.create_task(switched).model.attention["sparsity"] == (
      "sparse_topk")


@pytest.mark.parametrize("preset, sparsity, reinit", [
    ("", "gated", (".*/gate_(scale|bias)", "geco/.*")),
    (":sparsity=sparse_topk,k=2", "sparse_topk", ("geco/.*",))])
def test_addition_sparse_config_post_trains_the_base_run(preset, sparsity,
                                                         reinit):
  docstring = open(os.path.join(train_testing.CONFIGS,
                                "addition_sparse.py")).read()
  assert "--config configs/addition_sparse.py:sparsity=gated" in docstring
  config = train_testing.load_config("addition_sparse.py" + preset)
  base = train_testing.load_config("addition.py")
  assert config.task.name == "sparse_attention"
  assert config.model.attention.sparsity == sparsity
  assert config.model.attention.keys_per_query == (2 if "k=2" in preset
                                                   else 4)
  assert config.init_from.checkpoint == "/tmp/addition_run"
  assert tuple(config.init_from.reinit) == reinit
  assert bool(config.optimizer.lr_mults) == (sparsity == "gated")
  assert config.model.encoder == base.model.encoder
  assert (config.task.split_seed, config.task.test_fraction) == (
      base.task.split_seed, base.task.test_fraction)
