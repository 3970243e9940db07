r"""V-MoE S/4 (E=8, K=2, every other block) trained from scratch on CIFAR-10.

A V-MoE at CIFAR scale with the V-MoE paper's MoE settings: the paper's "S"
backbone (8 blocks, D=512, MLP 2048, 8 heads) on 32x32 images with 4x4
patches (65 tokens), 8 experts with K=2 in blocks 1, 3, 5, 7, groups of 8
images, capacity factor 1.05 (2.0 at eval time), router auxiliary losses
weighted 0.005; batch 1024, 200 epochs (9,765 steps), AdamW with peak
learning rate 1e-3, 1k warmup steps, cosine decay, weight decay 0.1,
clipping at norm 1, softmax cross-entropy with label smoothing 0.1. The
router is SparseTopK; switch with
`--config.model.encoder.moe.router.name=NoisyTopExpertsPerItem`.

Hardware: a Cloud TPU v3-8 (mesh 1 data x 8 expert partitions) or one GPU
with `--config.mesh.expert=1`.
Cost (estimate): about 1-4 TPUv3 chip-hours: about 13 GFLOP per training
image (65 tokens, 8 blocks, K=2 experts in 4 of them) x 200 epochs of 50k
images = 0.13 EFLOP, at 8-38 % of peak.

Command (dataset prepared with `tfds build cifar10` in $TFDS_DATA_DIR):

  python -m moe.main --config configs/cifar10_vmoe_s.py \
      --workdir /tmp/cifar10_vmoe_s

Expected: not measured (this project's machines have no CIFAR-10 and no
accelerator), and the V-MoE paper reports CIFAR-10 only after upstream
pre-training (google-research/vmoe: 98.7% for a V-MoE B/16 pre-trained on
ImageNet-21k). ViTs trained from scratch on CIFAR-10 with flips only, as
here, typically stay well below convolutional networks; record your number
here.

Presets: `runlocal` (a 2-block model, 10 steps of 16 images, 64 eval images).
"""
from moe.config import recipes

NUM_CLASSES = 10
BATCH_SIZE = 1024
TRAIN_IMAGES = 50_000


def get_config(arg=None):
  """Returns the config; `arg`: `runlocal`."""
  arg = recipes.parse_arg(arg, runlocal=False)
  config = recipes.base_config()
  config.dataset.name = "cifar10"
  config.dataset.train_split = "train"
  config.dataset.eval_split = "test"
  common = recipes.labels_pp(NUM_CLASSES)
  config.dataset.pp_train = f"decode|flip_lr|{common}"
  config.dataset.pp_eval = f"decode|{common}"
  config.dataset.batch_size = BATCH_SIZE
  config.dataset.eval_batch_size = 1000

  router = recipes.router_config("SparseTopK", capacity_factor=1.05,
                                 eval_capacity_factor=2.0)
  moe = recipes.moe_config(8, 2, layers="every_2", group_size=8 * 65,
                           router=router)
  config.model = recipes.vit_model(
      "S/4", NUM_CLASSES, hidden_size=512, num_layers=8, mlp_dim=2048,
      num_heads=8, moe=moe)
  config.total_steps = 200 * TRAIN_IMAGES // BATCH_SIZE
  config.task.label_smoothing = 0.1
  config.task.aux_loss_weight = 0.005
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.1
  config.optimizer.grad_clip_norm = 1.0
  config.optimizer.schedule.name = "warmup_cosine"
  config.optimizer.schedule.warmup_steps = 1_000
  config.mesh.expert = 8
  config.mesh.partition_rules = recipes.EXPERT_PARTITION_RULES
  config.evaluation.every_steps = 1_000
  config.checkpoint.every_steps = 1_000
  config.logging.every_steps = 100
  if arg.runlocal:
    recipes.make_runlocal(config)
  return config
