r"""V-MoE B/32 (E=8, K=2, every other block) pre-trained on ImageNet-21k.

The V-MoE paper's (Riquelme et al., 2021) ImageNet-21k upstream setting, as
released in google-research/vmoe (`vmoe_paper/pretrain_imagenet21k.py`,
there for B/16) with 32x32 patches: ViT-B (12 blocks, D=768, MLP 3072, 12
heads) at 224 px, 8 experts with K=2 in blocks 1, 3, ..., 11, groups of 8
images, capacity factor 1.05; batch 4096, 950,000 steps (about 274 epochs
of the 14.2M images; the first 102,400 images of `full` are held out for
evaluation), AdamW with peak learning rate 8e-4, 10k warmup steps, linear
decay, weight decay 0.1, clipping at norm 1, sigmoid cross-entropy over the
21,843 classes. Here with
the SparseTopK router; `--config.model.encoder.moe.router.name=
NoisyTopExpertsPerItem` is the paper's (with its own noise_std = 1.0).

Hardware: Cloud TPU v3-256 or larger (expert partitions: 8).
Cost (estimate, no published run): about 0.3-1.3 k TPUv3 chip-hours per 100
epochs, so 0.8-3.6 k for the 274 epochs here (950k steps of 4096 images):
V-MoE-B/32 with E=8, K=2 on every other block costs about 34 GFLOP per
training image at 224 px, at 8-38 % of peak (launch/README.md).

Command (dataset prepared with `tfds build imagenet21k` in $TFDS_DATA_DIR):

  python -m moe.main --config configs/imagenet21k_vmoe_b32.py \
      --workdir gs://BUCKET/imagenet21k_vmoe_b32

Expected: no published number for this exact upstream run. For reference,
google-research/vmoe reports the B/16 variant of this recipe (with RandAugment
"strong" and mixup) at 85.6% top-1 on ILSVRC2012 and 98.7% on CIFAR-10 after
fine-tuning; B/32 is cheaper (a quarter of the tokens) and less accurate. Not
run here (no data, no TPU); the eval metric written here is precision@1 on
the held-out images.

Presets: `runlocal` (a 2-block model, 10 steps of 16 images, 64 eval images).
"""
from moe.config import recipes

NUM_CLASSES = 21_843


def get_config(arg=None):
  """Returns the config; `arg`: `runlocal`."""
  arg = recipes.parse_arg(arg, runlocal=False)
  config = recipes.base_config()
  config.dataset.name = "imagenet21k"
  config.dataset.train_split = "full[102400:]"
  config.dataset.eval_split = "full[:102400]"
  config.dataset.pp_train, config.dataset.pp_eval = recipes.imagenet_pp(
      NUM_CLASSES)
  config.dataset.batch_size = 4096
  config.dataset.eval_batch_size = 4096
  config.dataset.shuffle_buffer = 250_000
  config.dataset.prefetch = 4

  router = recipes.router_config("SparseTopK", capacity_factor=1.05)
  moe = recipes.moe_config(8, 2, layers="every_2", group_size=8 * 50,
                           router=router)
  config.model = recipes.vit_model("B/32", NUM_CLASSES, moe=moe)
  recipes.vmoe_recipe(config, learning_rate=8e-4, total_steps=950_000)
  config.mesh.expert = 8
  config.mesh.partition_rules = recipes.EXPERT_PARTITION_RULES
  config.evaluation.every_steps = 10_000
  config.checkpoint.every_steps = 1_000
  config.logging.every_steps = 100
  if arg.runlocal:
    recipes.make_runlocal(config)
  return config
