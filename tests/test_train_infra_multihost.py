"""Tests of moe.parallel.multihost: when jax.distributed.initialize is called."""
import os

import jax
import pytest

from moe.parallel import multihost


@pytest.fixture
def initialize_calls(monkeypatch):
  """Records calls of jax.distributed.initialize instead of running them."""
  calls = []
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: calls.append(kwargs))
  return calls


@pytest.mark.parametrize("environ", [
    {},
    {"MOE_NUM_PROCESSES": "1"},
    {"SLURM_JOB_ID": "42", "SLURM_NTASKS": "1"},
    {"OMPI_COMM_WORLD_SIZE": "1"},
    {"TPU_WORKER_HOSTNAMES": "localhost"},
    {"HOSTNAME": "laptop", "CUDA_VISIBLE_DEVICES": "0"},
])
def test_single_process_does_not_initialize(initialize_calls, environ):
  assert not multihost.maybe_initialize_distributed(environ=environ)
  assert initialize_calls == []


def test_single_process_with_the_real_environment_does_not_initialize(
    initialize_calls):
  for name in ("MOE_COORDINATOR_ADDRESS", "MOE_NUM_PROCESSES", "MOE_PROCESS_ID",
               "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
               "MEGASCALE_COORDINATOR_ADDRESS"):
    if name in os.environ:
      pytest.skip(f"{name} is set in this environment")
  assert not multihost.maybe_initialize_distributed()
  assert initialize_calls == []
  assert multihost.is_main_process()


def test_moe_environment_variables_initialize_with_their_values(
    initialize_calls):
  environ = {"MOE_COORDINATOR_ADDRESS": "10.0.0.1:1234",
             "MOE_NUM_PROCESSES": "4", "MOE_PROCESS_ID": "3"}
  assert multihost.maybe_initialize_distributed(environ=environ)
  assert initialize_calls == [dict(coordinator_address="10.0.0.1:1234",
                                   num_processes=4, process_id=3)]


def test_arguments_override_the_environment(initialize_calls):
  environ = {"MOE_COORDINATOR_ADDRESS": "10.0.0.1:1234",
             "MOE_NUM_PROCESSES": "4", "MOE_PROCESS_ID": "3"}
  assert multihost.maybe_initialize_distributed(
      "localhost:5555", num_processes=2, process_id=0, environ=environ)
  assert initialize_calls == [dict(coordinator_address="localhost:5555",
                                   num_processes=2, process_id=0)]
  assert not multihost.maybe_initialize_distributed(num_processes=1,
                                                    environ=environ)
  assert len(initialize_calls) == 1


@pytest.mark.parametrize("environ, cluster", [
    ({"SLURM_JOB_ID": "42", "SLURM_NTASKS": "8"}, "slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1"}, "cloud_tpu"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, "cloud_tpu"),
])
def test_cluster_environments_let_jax_detect_the_cluster(initialize_calls,
                                                         environ, cluster):
  assert multihost.detect_cluster(environ) == cluster
  assert multihost.maybe_initialize_distributed(environ=environ)
  assert initialize_calls == [{}]


def test_force_initializes_without_a_recognised_environment(initialize_calls):
  assert multihost.maybe_initialize_distributed(force=True, environ={})
  assert initialize_calls == [{}]


def test_already_initialized_is_not_initialized_again(monkeypatch,
                                                      initialize_calls):
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  assert multihost.maybe_initialize_distributed(force=True, environ={})
  assert initialize_calls == []


@pytest.mark.parametrize("environ, message", [
    ({"MOE_NUM_PROCESSES": "2", "MOE_PROCESS_ID": "0"},
     "MOE_NUM_PROCESSES=2 needs MOE_COORDINATOR_ADDRESS"),
    ({"MOE_COORDINATOR_ADDRESS": "h:1", "MOE_PROCESS_ID": "0"},
     "MOE_NUM_PROCESSES \\(or num_processes\\) must be set"),
    ({"MOE_COORDINATOR_ADDRESS": "h:1", "MOE_NUM_PROCESSES": "two",
      "MOE_PROCESS_ID": "0"},
     "MOE_NUM_PROCESSES must be an integer, got 'two'"),
    ({"MOE_COORDINATOR_ADDRESS": "h:1", "MOE_NUM_PROCESSES": "2",
      "MOE_PROCESS_ID": "2"}, "MOE_PROCESS_ID must be in 0..1, got 2"),
])
def test_incomplete_explicit_settings_are_errors(initialize_calls, environ,
                                                 message):
  with pytest.raises(ValueError, match=message):
    multihost.maybe_initialize_distributed(environ=environ)
  assert initialize_calls == []
