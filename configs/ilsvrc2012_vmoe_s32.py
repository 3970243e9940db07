r"""V-MoE S/32 (E=8, K=2, last 2) trained from scratch on ILSVRC2012 (ImageNet).

The V-MoE paper's (Riquelme et al., 2021) ILSVRC2012 from-scratch setting, as
released in google-research/vmoe (`vmoe_s32_last2_ilsvrc2012_randaug_light1`):
the paper's "S" backbone (8 blocks, D=512, MLP 2048, 8 heads; not the 12-block
ViT-S), 32x32 patches at 224 px, 8 experts with K=2 in blocks 5 and 7 (the
last two odd blocks), groups of 8 images, capacity factor 1.05 at train time
and 4.0 at eval time; batch 8192, 300 epochs of `train[:99%]` (46,448 steps),
AdamW with peak learning rate 3e-3, 10k warmup steps, linear decay, weight
decay 0.1, clipping at norm 1, sigmoid cross-entropy. Here with the SparseTopK
router; `--config.model.encoder.moe.router.name=NoisyTopExpertsPerItem` is
the paper's router (with its own noise_std = 1.0).

Hardware: Cloud TPU v3-32 (32 cores; mesh 4 data x 8 expert partitions).
Cost: about 93 TPUv3 chip-hours per run (5h50m on a v3-32 = 16 chips, see
Expected; launch/README.md converts to other chips).

Command (ImageNet prepared once with `tfds build imagenet2012` in
$TFDS_DATA_DIR; on a TPU pod slice run it on every host, see launch/):

  python -m moe.main --config configs/ilsvrc2012_vmoe_s32.py \
      --workdir gs://BUCKET/ilsvrc2012_vmoe_s32

Expected (from google-research/vmoe, NoisyTopExpertsPerItem router, with
RandAugment "light1" and mixup): about 5h50m on a TPU v3-32 and 73.1% top-1
on the ILSVRC2012 validation set (mean of 3 seeds). Not run here: this
project has neither the data nor the TPU. `moe.data` has no RandAugment or
mixup op and expert dropout is the encoder's dropout, so expect a few points
less until those exist.

Presets: `runlocal` (a 2-block model, 10 steps of 16 images, 64 eval images:
a smoke test of the pipeline on any host that has the dataset).
"""
from moe.config import recipes

NUM_CLASSES = 1000
BATCH_SIZE = 8192
TRAIN_IMAGES = 1_268_355  # train[:99%]


def get_config(arg=None):
  """Returns the config; `arg`: `runlocal`."""
  arg = recipes.parse_arg(arg, runlocal=False)
  config = recipes.base_config()
  config.dataset.name = "imagenet2012"
  config.dataset.train_split = "train[:99%]"
  config.dataset.eval_split = "validation"
  config.dataset.pp_train, config.dataset.pp_eval = recipes.imagenet_pp(
      NUM_CLASSES)
  config.dataset.batch_size = BATCH_SIZE
  config.dataset.eval_batch_size = BATCH_SIZE
  config.dataset.prefetch = 4

  router = recipes.router_config("SparseTopK", capacity_factor=1.05,
                                 eval_capacity_factor=4.0)
  moe = recipes.moe_config(8, 2, layers=(5, 7), group_size=8 * 50,
                           router=router)
  config.model = recipes.vit_model(
      "S/32", NUM_CLASSES, hidden_size=512, num_layers=8, mlp_dim=2048,
      num_heads=8, moe=moe)
  recipes.vmoe_recipe(config, learning_rate=3e-3,
                      total_steps=300 * TRAIN_IMAGES // BATCH_SIZE)
  config.mesh.expert = 8
  config.mesh.partition_rules = recipes.EXPERT_PARTITION_RULES
  config.evaluation.every_steps = 2_000
  config.checkpoint.every_steps = 1_000
  config.logging.every_steps = 100
  if arg.runlocal:
    recipes.make_runlocal(config)
  return config
