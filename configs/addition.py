r"""Two-digit addition with a small causal decoder: `36+28=` -> `00064`.

The base model of sparse attention post-training: a decoder-only
transformer (`moe.nn.decoder`: D=128, 4 blocks, MLP 512, 4 heads, learned
positions, dense causal attention) trained by next-token cross-entropy on
the 5 answer tokens of `moe.data.addition` (`moe.train.sequence_task`,
`config.task.name="addition"`): 8,000 train pairs, 2,000 held out (split
seed 0). Exact match is the fraction of held-out pairs whose 5 answer
digits are all right (equal to greedy decoding).

Command:

  python -m moe.main --config configs/addition.py --workdir /tmp/addition_run

Expected (measured on a 2-core CPU shared with other jobs, load average
about 5, 2026-12-04, jax 0.10.2): about 5.5 minutes including start-up
(between 1 and 8.5 steps/s as the load varied, 2.9 on average), ending
with

  final: step=800 eval_exact_match=1.0000 eval_token_accuracy=1.0000 eval_loss=0.000 wall_s=307

on the 2,000 held-out pairs (one pair is 0.0005). Held-out exact match was
0.1085, 0.9845 and 1.0000 at steps 200, 400 and 600; with another
initialisation and split (`--config.seed=1 --config.task.split_seed=1`)
0.0860, 0.9950, 1.0000 and the same final line.

Schedule (`moe.config.recipes.addition_config`): 800 steps of 256 rows (26
epochs of the 8,000 train pairs), AdamW 1e-3 with weight decay 0.1 on the
kernels, 100 warmup steps then cosine decay to 0, gradient clipping at
norm 1; evaluation and a checkpoint every 200 steps (the last 2 and the
best by `eval_exact_match` kept). A killed run resumes where it stopped.

Presets (`--config configs/addition.py:ARG`): `runlocal` (a 2-block D=32
model, 20 steps of 64 rows: a smoke test in seconds). The attention's
sparsity is an override (`moe.nn.attention`), e.g.
`--config.model.attention.sparsity=sparse_topk`.
"""
from moe.config import recipes


def get_config(arg=None):
  """Returns the config.

  Args:
    arg: `runlocal`: a 2-block model, 20 steps (a smoke test in seconds).

  Returns:
    The experiment config.
  """
  arg = recipes.parse_arg(arg, runlocal=False)
  return recipes.addition_config(runlocal=arg.runlocal)
