"""Parallelism: the device mesh, where arrays live on it, multi-host start-up.

Modules:
  partitioning: the ('data', 'expert') mesh of `config.mesh`, parameter
    shardings from regex partition rules, optimizer-state shardings that
    follow the parameters, and the global batch (`shard_batch`).
  multihost: `jax.distributed` start-up, only for multi-process jobs.
  hlo: the collectives of a compiled program and the bytes they move.
"""
