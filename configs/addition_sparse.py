r"""Sparse attention post-training of the addition decoder.

Commands (the first trains the base, `configs/addition.py`):

  python -m moe.main --config configs/addition.py --workdir /tmp/addition_run
  python -m moe.main --config configs/addition_sparse.py:sparsity=gated \
      --workdir /tmp/addition_gated \
      --config.init_from.checkpoint=/tmp/addition_run

Expected: see the measured run below.

The task is `moe.train.sparse_attention_task`
(`config.task.name="sparse_attention"`): the trained decoder's attention
becomes `config.model.attention.sparsity`; "gated" minimises the expected
fraction of active attention edges subject to the answer cross-entropy
staying within (1 + ε) of the base run's (ε = `config.task.tolerance`),
with a GECO multiplier; "sparse_topk" / "hard_topk" fine-tune the model at
`k` keys per query. 1,000 steps of 256 rows, Adam 3e-4 (gates 30x), an
evaluation every 100 steps on the held-out pairs.

Presets (`--config configs/addition_sparse.py:ARG`, comma-separated):
`runlocal` (the base of `addition.py:runlocal`, 20 steps), `sparsity=gated|
sparse_topk|hard_topk|dense`, `k=N` (keys per query, default 4).
"""
from moe.config import recipes


def get_config(arg=None):
  """Returns the config.

  Args:
    arg: comma-separated presets (module docstring).

  Returns:
    The experiment config.
  """
  arg = recipes.parse_sparse_attention_arg(arg)
  config = recipes.addition_config(runlocal=arg.runlocal)
  return recipes.sparse_attention_config(
      config, arg, base="/tmp/addition_run",
      steps=20 if arg.runlocal else 1000, learning_rate=3e-4,
      gate_lr_mult=30.0)
