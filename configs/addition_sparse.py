r"""Sparse attention post-training of the addition decoder.

Commands (the first trains the base, `configs/addition.py`):

  python -m moe.main --config configs/addition.py --workdir /tmp/addition_run
  python -m moe.main --config configs/addition_sparse.py:sparsity=gated \
      --workdir /tmp/addition_gated \
      --config.init_from.checkpoint=/tmp/addition_run

Expected (measured on a 2-core CPU shared with a test run, 2026-12-04,
jax 0.10.2, from a base run ending at exact match 1.000 and held-out CE
0.0003): about 11 minutes (1.5 steps/s), ending with

  final: step=1000 eval_exact_match=0.9995 eval_loss=0.002 eval_edge_fraction=0.1183 eval_multiplier=0.0047 wall_s=649

12% of the causal attention edges active (held-out, gates deterministic);
the multiplier first rises to its bound 1e4 while the stochastic gates
raise the CE (exact match 0.98 at step 100), then falls once the CE is
back under its target, and edges close from step 600 on (edge fraction
0.99 at 600, 0.46 at 700, 0.29 at 800, 0.20 at 900).

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
