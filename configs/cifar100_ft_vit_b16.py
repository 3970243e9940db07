r"""Fine-tunes ViT-B/16 pre-trained on ImageNet-21k on CIFAR-100 at 384 px.

The ViT paper's (Dosovitskiy et al., 2021) transfer recipe, as released in
google-research/vision_transformer (`vit_jax/configs/common.py`, cifar100):
ViT-B/16 (12 blocks, D=768, MLP 3072, 12 heads) initialised from the public
ImageNet-21k checkpoint `ViT-B_16.npz`; the pre-training head and
pre-logits are dropped and the new 100-class head starts at zero
(`moe.checkpoints.init_from`: transform "new_head"; `pre_logits` is unused,
`init_from.allow_unused=('pre_logits/.*',)`); the 14x14 grid of position
embeddings (224 px) is resized to 24x24 (384 px) by corner-aligned bilinear
interpolation, as the ViT repository's loader does (`scipy.ndimage.zoom`,
order 1), the class token kept. Training: `train[:98%]`,
resize to 448 then random 384 crop and flip, pixels in [-1, 1]; evaluation
on `test` resized to 384. SGD with momentum 0.9, batch 512, peak learning
rate 0.03, 500 warmup steps then cosine decay to 0, clipping at global norm
1, no weight decay (none on the head in any case), softmax cross-entropy,
10,000 updates (about 100 epochs).

Hardware: Cloud TPU v3-8 (8 cores, 16 GiB each) or larger; data parallel
(mesh 8 data x 1 expert). Like the ViT repository (`accum_steps=8` on 8
GPUs of 16 GB), each update accumulates the gradients of 8 micro-batches of
64 images (`:accumulation=8`, the default, so `total_steps` counts 80,000
micro-batches); with more memory per core use `:accumulation=2` or
`:accumulation=1`.

Command (CIFAR-100 prepared with `tfds build cifar100` in $TFDS_DATA_DIR; the
checkpoint is read from the public bucket, or from a local copy downloaded
with `wget https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz`
and passed as `--config.init_from.checkpoint=/path/ViT-B_16.npz`):

  python -m moe.main --config configs/cifar100_ft_vit_b16.py \
      --workdir gs://BUCKET/cifar100_ft_vit_b16

Expected (from google-research/vision_transformer, same recipe, two runs on
8 V100 GPUs): 92.26% and 92.64% top-1 on the CIFAR-100 test set, 7.2 h and
7.5 h. Not run here (no data, no accelerator). Cost (estimate): about 10-30
TPUv3 chip-hours: 1.7 EFLOP (110 GFLOP forward per 384 px image, x3 for
training, x 10k updates x 512 images) at 20-38 % of peak gives 10-20; the
V100 time above, on a v3-8 (4 chips of about the same peak as 2 V100s),
gives about 30. Shorter schedules
trade accuracy for time: the same repository reports 91.15% after 1,000
updates (100 warmup), `--config.total_steps=8000
--config.optimizer.schedule.warmup_steps=100` with the default accumulation.

Other losses are one preset away, e.g. `:loss=topk_xent` for the top-k loss
of `experiments/topk_loss_vit.py --scale=full`, whose options are then
overrides such as `--config.task.loss_options.regularization=0.5` (names:
`moe.train.losses.LOSSES`).

Presets: `runlocal` (a 2-block model trained from scratch, no checkpoint, 10
steps of 16 images: a smoke test of the pipeline on a host with the
dataset), `accumulation=A` (micro-batches per update; the batch of an update
stays 512), `loss=NAME` (default softmax_xent).
"""
from moe.config import recipes

NUM_CLASSES = 100
BATCH_SIZE = 512
UPDATES = 10_000
IMAGE_SIZE = 384
VIT_B16_I21K = "gs://vit_models/imagenet21k/ViT-B_16.npz"


def get_config(arg=None):
  """Returns the config.

  Args:
    arg: comma-separated presets: `runlocal`, `accumulation=A` (default 8),
      `loss=NAME` (default softmax_xent).

  Returns:
    The experiment config.
  """
  arg = recipes.parse_arg(arg, runlocal=False, accumulation=8,
                          loss="softmax_xent")
  if arg.accumulation < 1 or BATCH_SIZE % arg.accumulation:
    raise ValueError(f"accumulation must divide the batch {BATCH_SIZE}, got "
                     f"{arg.accumulation}.")
  config = recipes.base_config()
  config.dataset.name = "cifar100"
  config.dataset.train_split = "train[:98%]"
  config.dataset.eval_split = "test"
  common = recipes.labels_pp(NUM_CLASSES)
  config.dataset.pp_train = (f"decode|resize({IMAGE_SIZE * 7 // 6})|"
                             f"random_crop({IMAGE_SIZE})|flip_lr|{common}")
  config.dataset.pp_eval = f"decode|resize({IMAGE_SIZE})|{common}"
  config.dataset.batch_size = BATCH_SIZE // arg.accumulation
  config.dataset.eval_batch_size = BATCH_SIZE

  config.model = recipes.vit_model("B/16", NUM_CLASSES)
  recipes.set_loss(config, arg.loss)
  config.init_from.checkpoint = VIT_B16_I21K
  config.init_from.allow_unused = ("pre_logits/.*",)

  config.total_steps = UPDATES * arg.accumulation
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.9
  config.optimizer.learning_rate = 0.03
  config.optimizer.weight_decay = 0.0
  config.optimizer.weight_decay_exclude = ("head/.*",)
  config.optimizer.grad_clip_norm = 1.0
  config.optimizer.accumulation_steps = arg.accumulation
  config.optimizer.schedule.name = "warmup_cosine"
  config.optimizer.schedule.warmup_steps = 500
  config.evaluation.every_steps = 1_000 * arg.accumulation
  config.checkpoint.every_steps = 1_000 * arg.accumulation
  config.logging.every_steps = 50 * arg.accumulation
  if arg.runlocal:
    recipes.make_runlocal(config)
    config.init_from.checkpoint = None
    config.optimizer.accumulation_steps = 1
  return config
