"""Checkpoints: the orbax train-state checkpoints of a run, and `init_from`.

Modules:
  manager: `Checkpointer`, the one checkpoint format (orbax, in
    WORKDIR/checkpoints: train state and data position per step), and
    `restore_checkpoint` / `restore_params` by path.
  integrity: on-device checksums and finiteness of a state, recorded with
    every checkpoint and verified on restore.
  layouts: the parameter names of public ViT `.npz` files (vision_transformer,
    big_vision), detected and converted to ours, and back for export.
  init_from: initial parameters of a new run from one of our checkpoints or
    a public ViT `.npz` (`config.init_from`).
"""
from moe.checkpoints.manager import CHECKPOINT_SUBDIR
from moe.checkpoints.manager import CheckpointConfig
from moe.checkpoints.manager import CheckpointError
from moe.checkpoints.manager import Checkpointer
from moe.checkpoints.manager import Restored
from moe.checkpoints.manager import restore_checkpoint
from moe.checkpoints.manager import restore_params
from moe.checkpoints.manager import UNREADABLE_SUFFIX

__all__ = [
    "CHECKPOINT_SUBDIR",
    "CheckpointConfig",
    "CheckpointError",
    "Checkpointer",
    "Restored",
    "restore_checkpoint",
    "restore_params",
    "UNREADABLE_SUFFIX",
]
