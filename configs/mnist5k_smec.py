r"""SMEC on the embedded mnist5k: compress a ViT's 64-d embeddings to 32, 16, 8.

Commands (the first trains the frozen backbone, `configs/mnist5k_vit.py`):

  python -m moe.main --config configs/mnist5k_vit.py --workdir /tmp/mnist5k_vit
  python -m moe.main --config configs/mnist5k_smec.py --workdir /tmp/smec \
      --config.task.backbone=/tmp/mnist5k_vit

Expected (measured on a 2-core CPU, 2026-12-03, jax 0.10.2): about 1
minute including start-up and embedding the 5,000 images, ending with

  final: step=600 eval_ndcg10_full=0.9090 eval_ndcg10_d32=0.9070 eval_ndcg10_d16=0.8987 eval_ndcg10_d8=0.8949 wall_s=52

(retrieval of the 1,000 test images among the 4,000 train images by
class, `moe.compress.retrieval`; another CPU or backbone run may end a
little away).

The task is `moe.train.smec_task` (`config.task.name="smec"`): the
backbone's pre-logits embeddings (D=64) are computed once; SMRL in 3
stages of 200 steps of 128 embeddings, D -> 32 -> 16 -> 8, each stage
selecting among the dimensions the previous one kept (sparse top-k
selector, λ = 0.1, p = 4/3) by the listwise rank loss at τ = 0.05, with a
projection head trained in the first stage; Adam 3e-3. An evaluation and a
checkpoint end every stage; a killed run resumes where it stopped.

Presets (`--config configs/mnist5k_smec.py:ARG`, comma-separated):
`runlocal` (the runlocal backbone of `mnist5k_vit.py:runlocal`, D=32, 3
stages of 10 steps), `method=smec|mrl` (mrl: the Matryoshka baseline),
`selector=sparse_topk|gumbel_topk|hard_ste`, `memory=true` (S-XBM hard
pairs from a queue of 1,024 embeddings).
"""
from moe.config import recipes


def get_config(arg=None):
  """Returns the config.

  Args:
    arg: comma-separated presets (module docstring).

  Returns:
    The experiment config.
  """
  arg = recipes.parse_smec_arg(arg)
  config = recipes.mnist5k_config(runlocal=arg.runlocal)
  if arg.runlocal:
    config.dataset.batch_size = 64
  return recipes.smec_config(
      config, arg, backbone="/tmp/mnist5k_vit",
      stage_steps=10 if arg.runlocal else 200, learning_rate=3e-3)
