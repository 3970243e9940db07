"""Training: the loop, its tasks and the infrastructure around it.

Modules:
  trainer: `train_and_evaluate(config, workdir)`, the train loop.
  tasks: the task protocol (data, model, loss, metrics) and classification.
  losses: per-example losses by name.
  train_state: the train state, its shardings, initialisation and step.
  evaluation: evaluation over the eval split.
  train_metrics: train metrics between reports; the finite-loss check.
  preemption: SIGTERM handling and the multi-process preemption step.
  optimizers: optax optimizers and schedules from config.
  partitioning: the device mesh, parameter and batch shardings.
  checkpoints: orbax checkpoints of the train state and data position.
  multihost: `jax.distributed` start-up for multi-process jobs.
  metrics_writing: TensorBoard and console writers, progress reports.
  config_lib: building blocks of the experiment configs in `configs/`.
  config_fields, param_names: config sections as dataclasses; leaf names.
"""
