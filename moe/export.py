r"""Exports the parameters of a run as a public-ViT `.npz`, or a PQK student.

  python -m moe.export --workdir /tmp/digits_vit --out /tmp/digits_vit.npz
  python -m moe.export --workdir W --step 400 --out model.npz \
      --layout big_vision
  python -m moe.export --workdir /tmp/pqk --out student.npz \
      --pqk_config configs/mnist5k_pqk_mlp.py

With `--pqk_config` (the run's config file, with the same overrides, e.g.
`--pqk_config.task.sparsity=0.5`) the file is the compressed student of a
PQK run (`moe.compress.student_file`: packed low-bit codes, bitmask,
scales), read back by `moe.compress.student_file.read_student`; the command
prints its size on disk.

The file holds '/'-joined parameter names (`np.savez`), in the layout
`--layout` names (`moe.checkpoints.layouts`):

  vit_jax (default)  the names of the `.npz` files released by
                     google-research/vision_transformer, which its
                     `checkpoint.load` reads (converting the block numbering
                     with flax's `convert_pre_linen`);
  vit_jax_linen      the same model with today's flax block numbering;
  big_vision         big_vision's `models/vit.py` names, read by its
                     `vit.load`: per-type block numbering, `pos_embedding`
                     at the top without a class slot (its value for the class
                     token is added to `cls`: big_vision's model gives the
                     class token no position embedding), bare parameters.

A dense ViT maps one to one; classifier "token", "gap" and "map" are
big_vision's `pool_type` "tok", "gap" and "map". A V-MoE is written with the
same names for its dense parts, and every MoE block as
`Transformer/encoderblock_N/MoeBlock_3/` (`MoeBlock_0` in the per-type
layouts) `{Router/..., Experts/Dense_0/{kernel [E, D, H], bias [E, H]},
Experts/Dense_1/{kernel [E, H, D], bias [E, D]}}`: the experts stacked on a
leading axis. Neither reference codebase has MoE blocks; our
`config.init_from` reads these files back in every layout.

Only the parameters are read from the checkpoint (no model config is
needed); the file is written to `OUT.tmp` and moved onto `OUT`, so an
interrupted export leaves no partial `OUT`.
"""
from __future__ import annotations

import os

from absl import app
from absl import flags
from etils import epath
import numpy as np

from ml_collections import config_flags

from moe.checkpoints import init_from
from moe.checkpoints import layouts
from moe.checkpoints import manager
from moe.config import param_names
from moe.train import tasks

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Workdir (or checkpoint directory) of the run.")
_STEP = flags.DEFINE_integer(
    "step", None, "Saved step to export; default: the latest readable one.")
_OUT = flags.DEFINE_string("out", None, "The .npz file to write.")
_LAYOUT = flags.DEFINE_enum(
    "layout", "vit_jax", layouts.LAYOUTS,
    "Parameter names of the file: vit_jax (google-research/"
    "vision_transformer's released files), vit_jax_linen or big_vision.")
_PQK_CONFIG = config_flags.DEFINE_config_file(
    "pqk_config", None, "Config file of a PQK run (config.task.name='pqk'): "
    "export its compressed student instead of the parameters.")
flags.mark_flags_as_required(["workdir", "out"])


def read_params(workdir: str | os.PathLike,
                step: int | None = None) -> dict[str, np.ndarray]:
  """The parameters of a run's checkpoint, by our '/'-joined names.

  Args:
    workdir: the run's workdir or its checkpoint directory.
    step: a saved step; None for the latest readable one.

  Raises:
    manager.CheckpointError: if there is no such (readable) checkpoint; the
      message lists the saved steps.
  """
  if step is None:
    return dict(param_names.named_leaves(manager.restore_params(workdir)))
  directory = epath.Path(workdir)
  if (directory / manager.CHECKPOINT_SUBDIR).is_dir():
    directory = directory / manager.CHECKPOINT_SUBDIR
  if not directory.is_dir():
    raise manager.CheckpointError(f"checkpoint path {directory} does not "
                                  "exist.")
  with manager.Checkpointer(directory, read_only=True) as checkpointer:
    return dict(param_names.named_leaves(checkpointer.restore_params(step)))


def export(workdir: str | os.PathLike, out: str | os.PathLike,
           step: int | None = None,
           layout: str = "vit_jax") -> dict[str, np.ndarray]:
  """Writes a run's parameters to `out` in `layout` (see the module doc).

  Args:
    workdir: the run's workdir or checkpoint directory.
    out: the `.npz` path (suffix in any case).
    step: a saved step; None for the latest readable one.
    layout: one of `layouts.LAYOUTS`.

  Returns:
    The arrays written, by name.

  Raises:
    ValueError: for an `out` without the `.npz` suffix or an unknown layout.
    manager.CheckpointError: if the checkpoint cannot be read.
  """
  if not str(out).lower().endswith(init_from.NPZ_SUFFIX):
    raise ValueError(f"--out must be a path ending in .npz, got {str(out)!r}.")
  if layout not in layouts.LAYOUTS:
    raise ValueError(f"--layout must be one of {', '.join(layouts.LAYOUTS)}, "
                     f"got {layout!r}.")
  arrays = layouts.from_model_names(read_params(workdir, step), layout)
  out = epath.Path(out)
  partial = out.parent / (out.name + ".tmp")
  with partial.open("wb") as f:
    np.savez(f, **arrays)
  partial.replace(out)
  return arrays


def export_pqk_student(workdir: str | os.PathLike, out: str | os.PathLike,
                       config, step: int | None = None) -> int:
  """Writes the compressed student of a PQK run; returns its size in bytes.

  Args:
    workdir: the run's workdir or checkpoint directory.
    out: the `.npz` path.
    config: the run's experiment config (`config.task.name == "pqk"`).
    step: a saved step; None for the latest.

  Raises:
    ValueError: if the config is not a PQK run.
    manager.CheckpointError: if the checkpoint cannot be read.
  """
  if config.task.get("name") != "pqk":
    raise ValueError("--pqk_config must be a PQK run's config "
                     f"(config.task.name='pqk'), got {config.task.get('name')!r}.")
  directory = epath.Path(workdir)
  if (directory / manager.CHECKPOINT_SUBDIR).is_dir():
    directory = directory / manager.CHECKPOINT_SUBDIR
  with manager.Checkpointer(directory, read_only=True) as checkpointer:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise manager.CheckpointError(f"no checkpoint in {directory}.")
    params = checkpointer.restore_params(step)
  task = tasks.create_task(config)
  return task.export_student(params, step, str(out), config.model)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if _PQK_CONFIG.value is not None:
    size = export_pqk_student(_WORKDIR.value, _OUT.value, _PQK_CONFIG.value,
                              _STEP.value)
    print(f"wrote {_OUT.value}: the PQK student, {size / 1024:.1f} KB on "
          "disk")
    return
  arrays = export(_WORKDIR.value, _OUT.value, _STEP.value, _LAYOUT.value)
  size = sum(value.nbytes for value in arrays.values())
  print(f"wrote {_OUT.value}: {len(arrays)} arrays, {size / 2**20:.1f} MiB, "
        f"layout {_LAYOUT.value}")


if __name__ == "__main__":
  app.run(main)
