r"""Fine-tunes the dense digits ViT into a V-MoE with the SparseTopK router.

Sparse upcycling on the embedded digits: the model of
`configs/digits_vmoe.py` (MLPs of blocks 1 and 3 replaced by E=8 experts,
K=2, SparseTopK router) starts from the checkpoint of `configs/digits_vit.py`:
every expert is a copy of the dense MLP of its block, the routers are fresh,
everything else is copied (`moe.checkpoints.init_from.VIT_TO_VMOE_RULES`). The
combine weights are the gates renormalised over the dispatched experts
(`combine="gate_softmax"`), so that identical experts reproduce the dense
MLP: the upcycled model starts where the dense one ended (up to the tokens
over capacity). Then 400 steps of Adam, peak learning rate 1e-3, 20 warmup
steps, cosine decay, clipping at norm 1, no weight decay (none on the head
in any case), batch 128.

Commands, in order (the second reads the first one's workdir):

  python -m moe.main --config configs/digits_vit.py --workdir /tmp/digits_vit
  python -m moe.main --config configs/digits_ft_vmoe.py \
      --workdir /tmp/digits_ft --config.init_from.checkpoint=/tmp/digits_vit

The same V-MoE and recipe from scratch, for comparison (an empty checkpoint
means a fresh initialisation):

  python -m moe.main --config configs/digits_ft_vmoe.py \
      --workdir /tmp/digits_vmoe_400 --config.init_from.checkpoint=

Expected (measured on a 2-core CPU shared with other jobs, 2026-11-21;
about 1.5 minutes including start-up for the fine-tuning):

  dense ViT (digits_vit.py), 1000 steps:
    final: step=1000 eval_accuracy=0.9639 eval_top5=0.9972 eval_loss=0.179 wall_s=178
  upcycled V-MoE before fine-tuning (the evaluator on the initial
    parameters): eval_accuracy=0.9639, as the dense model
  fine-tuned V-MoE (this config), 400 steps:
    final: step=400 eval_accuracy=0.9722 eval_top5=0.9972 eval_loss=0.179 wall_s=76
  the same V-MoE and recipe from scratch, 400 steps:
    final: step=400 eval_accuracy=0.8500 eval_top5=0.9694 eval_loss=0.587 wall_s=136
  configs/digits_vmoe.py (the from-scratch recipe) with
  --config.total_steps=400:
    final: step=400 eval_accuracy=0.9194 eval_top5=0.9972 eval_loss=0.258 wall_s=54

(wall_s varies with the load of the shared machine; the accuracies are
deterministic.)

Recipe options are presets and overrides: the loss (`:loss=topk_xent`, the
top-k loss, whose options are then overrides such as
`--config.task.loss_options.p=2.0`; names: `moe.train.losses.LOSSES`),
frozen parameters (`--config.optimizer.frozen_params="('embedding/.*',)"`),
learning-rate multipliers
(`--config.optimizer.lr_mults="(('.*/Router/.*', 10.0),)"`), parameters kept
fresh (`--config.init_from.reinit="('head/.*',)"`), another router
(`--config.model.encoder.moe.router.name=NoisyTopExpertsPerItem`).

Presets (comma-separated): `runlocal` (the 2-block model of
`digits_vit.py:runlocal`, 20 steps: fine-tunes a checkpoint of
`configs/digits_vit.py:runlocal`), `loss=NAME` (default softmax_xent).
"""
from moe.config import recipes

DENSE_WORKDIR = "/tmp/digits_vit"


def get_config(arg=None):
  """Returns the config.

  Args:
    arg: comma-separated presets: `runlocal` (a 2-block model, 20 steps: a
      smoke test in seconds), `loss=NAME` (default softmax_xent).

  Returns:
    The experiment config.
  """
  arg = recipes.parse_arg(arg, runlocal=False, loss="softmax_xent")
  router = recipes.router_config("SparseTopK", capacity_factor=1.25,
                                 regularization=0.1,
                                 combine="gate_softmax")
  moe = recipes.moe_config(8, 2, layers="every_2", router=router)
  config = recipes.digits_config(moe, runlocal=arg.runlocal)
  config.init_from.checkpoint = DENSE_WORKDIR
  config.init_from.reinit = (".*/Router/.*",)
  recipes.set_loss(config, arg.loss)
  config.optimizer.weight_decay_exclude = ("head/.*",)
  if not arg.runlocal:
    config.total_steps = 400
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule.warmup_steps = 20
    config.evaluation.every_steps = 100
    config.checkpoint.every_steps = 100
  return config
