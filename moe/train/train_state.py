"""The train state: its shapes and shardings, its initialisation, the step.

A `TrainState` holds everything a resumed run needs besides the data
position: the step counter, the parameters, the optimizer state and the base
rng. Its placement is decided once, from shapes alone:

  layout = StateLayout.create(task, optimizer, batch_spec, mesh, mesh_config)
  state = layout.initialize(seed)           # or restore into layout.abstract
  train_step = make_train_step(layout)
  state, metrics = train_step(state, global_batch)

The step rng is `fold_in(state.rng, state.step)`, so a run resumed from a
checkpoint draws the same dropout masks and router noise as one that never
stopped.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax

from moe.checkpoints import integrity
from moe.config import param_names
from moe.parallel import partitioning
from moe.train import optimizers
from moe.train import tasks
from moe.train import train_metrics

PyTree = Any
Batch = Mapping[str, jax.Array]
# Fine-tuning hook: fresh parameters (global jax Arrays) -> parameters of the
# same structure and shapes, e.g. read from a checkpoint. In a multi-process
# job every process must return the same values (or global jax Arrays).
InitParamsFn = Callable[[PyTree], PyTree]


@flax.struct.dataclass
class TrainState:
  """What a train step reads and writes.

  Attributes:
    step: int32 scalar, train steps done.
    params: the task's parameters.
    opt_state: the optax state of `params`.
    rng: typed PRNG key; step s uses `fold_in(rng, s)`.
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  rng: jax.Array


def _split_seed(seed: int) -> tuple[jax.Array, jax.Array]:
  """Returns the (init, train) rngs of a run seed."""
  init_rng, train_rng = jax.random.split(jax.random.key(seed))
  return init_rng, train_rng


@dataclasses.dataclass(frozen=True)
class StateLayout:
  """Shapes and shardings of a task's train state on a mesh.

  Attributes:
    task: the task.
    optimizer: the optimizer.
    batch_spec: shapes of a global train batch.
    mesh: the device mesh.
    abstract: the `TrainState` of `jax.ShapeDtypeStruct`s with shardings
      (the target of a checkpoint restore).
    shardings: the `TrainState` of `NamedSharding`s.
  """
  task: tasks.Task
  optimizer: optimizers.Optimizer
  batch_spec: Mapping[str, jax.ShapeDtypeStruct]
  mesh: Mesh
  abstract: TrainState
  shardings: TrainState

  @classmethod
  def create(cls, task: tasks.Task, optimizer: optimizers.Optimizer,
             batch_spec: Mapping[str, jax.ShapeDtypeStruct], mesh: Mesh,
             mesh_config: partitioning.MeshConfig) -> "StateLayout":
    """Derives the state's shapes with `jax.eval_shape` and places them.

    Parameters follow `mesh_config.partition_rules` (and FSDP); optimizer
    state leaves follow the parameter they copy; the step and the rng are
    replicated.

    Args:
      task: the task.
      optimizer: the optimizer.
      batch_spec: shapes of a global train batch.
      mesh: the device mesh.
      mesh_config: `config.mesh`, parsed.

    Returns:
      The layout.
    """
    init_params = _params_initializer(task, batch_spec, mesh)
    with jax.set_mesh(mesh):
      params = jax.eval_shape(init_params, _split_seed(0)[0])
    shapes = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
        opt_state=jax.eval_shape(optimizer.tx.init, params),
        rng=jax.eval_shape(lambda: _split_seed(0)[1]))
    param_shardings = partitioning.param_shardings(
        params, mesh, mesh_config.partition_rules, mesh_config.fsdp_min_size)
    shardings = partitioning.shardings_like_params(shapes, params,
                                                   param_shardings, mesh)
    return cls(task=task, optimizer=optimizer, batch_spec=dict(batch_spec),
               mesh=mesh,
               abstract=partitioning.abstract_arrays(shapes, shardings),
               shardings=shardings)

  def initialize(self, seed: int,
                 init_params_fn: InitParamsFn | None = None) -> TrainState:
    """Returns a fresh train state, placed by `shardings`.

    Args:
      seed: the run seed; it decides the initial parameters and the rng.
      init_params_fn: optional hook that turns the fresh parameters into the
        initial ones (fine-tuning); its output is placed like the params.

    Returns:
      The state at step 0.
    """
    init_rng, _ = _split_seed(seed)
    params = partitioning.jit_on_mesh(
        _params_initializer(self.task, self.batch_spec, self.mesh), self.mesh,
        out_shardings=self.shardings.params)(init_rng)
    if init_params_fn is not None:
      params = _place_params(init_params_fn(params), self.abstract.params)

    def fresh_state(params):
      return TrainState(step=jnp.int32(0), params=params,
                        opt_state=self.optimizer.tx.init(params),
                        rng=_split_seed(seed)[1])

    return jax.jit(fresh_state, out_shardings=self.shardings,
                   donate_argnums=0)(params)


def _params_initializer(task: tasks.Task,
                        batch_spec: Mapping[str, jax.ShapeDtypeStruct],
                        mesh: Mesh) -> Callable[[jax.Array], PyTree]:
  """Returns rng -> fresh params, initialised on an all-zero global batch."""
  sharding = partitioning.batch_sharding(mesh)

  def init(rng):
    batch = {key: jax.lax.with_sharding_constraint(
        jnp.zeros(spec.shape, spec.dtype), sharding)
             for key, spec in batch_spec.items()}
    return task.init(rng, batch)

  return init


def _place_params(params: PyTree, abstract: PyTree) -> PyTree:
  """Places the output of an init hook; raises if its shapes are wrong.

  Host values (every process must pass the same) are placed shard by shard,
  which works in multi-process jobs too; jax Arrays are resharded.
  """
  if jax.tree.structure(params) != jax.tree.structure(abstract):
    raise ValueError(
        "init_params_fn must return the structure of the fresh parameters; "
        f"got {jax.tree.structure(params)}, expected "
        f"{jax.tree.structure(abstract)}.")

  def place(name, value, target):
    if np.shape(value) != target.shape:
      raise ValueError(
          f"init_params_fn returned shape {np.shape(value)} for parameter "
          f"{name!r}, expected {target.shape}.")
    if isinstance(value, jax.Array):
      return jax.device_put(value.astype(target.dtype), target.sharding)
    host = np.asarray(value, target.dtype)
    return jax.make_array_from_callback(target.shape, target.sharding,
                                        lambda index: host[index])

  return param_names.map_with_names(place, params, abstract)


def make_train_step(
    layout: StateLayout, check_state: bool = True
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """Returns the jitted train step: forward, loss, gradients, update.

  The step donates the input state. A task's optional hooks run inside it:
  `prepare_params(params, step)` before the forward pass (e.g. new pruning
  masks at a round's first step) and `mask_updates(updates, params, step)`
  on the optimizer's updates (e.g. zero for frozen weights: exactly
  unchanged, whatever the optimizer's momentum or weight decay), and
  `after_update(params, batch, step, metrics)` on the updated parameters,
  with the step's train metrics (e.g. a queue of the batch's embeddings, a
  Lagrange multiplier moved by the step's constraint). It returns the new state and the task's
  scalar metrics plus `learning_rate` (before `lr_mults`), `grad_norm`
  (global norm of the gradient) and `state_finite` (whether every float of
  the new parameters and optimizer state is finite), replicated.

  Args:
    layout: the state layout; the batch is split over all devices.
    check_state: compute `state_finite`; False reports True without looking
      (only to measure what the check costs, `experiments/bench_train.py`).

  Returns:
    `train_step(state, batch) -> (state, metrics)`.
  """
  task, optimizer = layout.task, layout.optimizer

  prepare_params = getattr(task, "prepare_params", None)
  mask_updates = getattr(task, "mask_updates", None)
  after_update = getattr(task, "after_update", None)

  def train_step(state: TrainState, batch: Batch):
    rng = jax.random.fold_in(state.rng, state.step)
    params = state.params
    if prepare_params is not None:
      params = prepare_params(params, state.step)
    grad_fn = jax.value_and_grad(task.train_loss, has_aux=True)
    (_, metrics), grads = grad_fn(params, batch, rng, state.step)
    updates, opt_state = optimizer.tx.update(grads, state.opt_state, params)
    if mask_updates is not None:
      updates = mask_updates(updates, params, state.step)
    params = optax.apply_updates(params, updates)
    if after_update is not None:
      params = after_update(params, batch, state.step, metrics)
    metrics = dict(metrics,
                   learning_rate=optimizer.learning_rate(state.step),
                   grad_norm=optax.global_norm(grads))
    metrics[train_metrics.STATE_FINITE] = (
        integrity.all_finite((params, opt_state)) if check_state
        else jnp.asarray(True))
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state)
    return new_state, metrics

  return partitioning.jit_on_mesh(
      train_step, layout.mesh,
      in_shardings=(layout.shardings,
                    partitioning.batch_sharding(layout.mesh)),
      out_shardings=(layout.shardings, partitioning.replicated(layout.mesh)),
      donate_argnums=0)
