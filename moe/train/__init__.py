"""Training: the loop and what it runs.

Modules:
  trainer: `train_and_evaluate(config, workdir)`, the train loop.
  tasks: the task protocol (data, model, loss, metrics) and classification.
  task_parts: what tasks share: rng streams, metrics, building from config.
  pqk_task: PQK, prune -> QAT -> mutual distillation (`config.task.name`
    "pqk").
  smec_task: SMEC and its Matryoshka baseline, embedding compression by
    learned dimension selection (`config.task.name` "smec").
  sequence_task: two-digit addition as next-token prediction on the answer
    tokens, exact-match accuracy (`config.task.name` "addition").
  sparse_attention_task: sparse attention post-training of the addition
    decoder, fewest active edges at the base loss by a GECO multiplier
    (`config.task.name` "sparse_attention").
  frozen_embeddings: a trained backbone's embeddings of a dataset.
  losses: per-example losses by name.
  train_state: the train state, its shardings, initialisation and step.
  evaluation: evaluation over the eval split.
  train_metrics: train metrics between reports; the finite loss and state
    checks.
  metrics_writing: TensorBoard and console writers, progress reports.
  optimizers: optax optimizers and schedules from `config.optimizer`.
  preemption: SIGTERM handling and the multi-process preemption step.
  workdir_lock: the exclusive lock a run holds on its workdir.

The config schema is `moe.config`, the mesh and shardings `moe.parallel`,
checkpoints and fine-tuning initialisation `moe.checkpoints`.
"""
