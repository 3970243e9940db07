"""Test set-up: every test run sees 8 fake CPU devices.

The flag must be set before jax initialises its backends, so it lives here,
at import time of the first conftest.
"""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  (must come after the flag)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def eight_devices():
  devices = jax.devices()
  assert len(devices) == 8, f"expected 8 fake CPU devices, got {len(devices)}"
  return devices


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
  """A data dir holding the prepared embedded digits dataset."""
  from moe.data import sources  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  sources.load_builder("digits", data_dir)
  return data_dir


@pytest.fixture(scope="session")
def mnist5k_data_dir(tmp_path_factory):
  """A data dir holding the prepared embedded mnist5k dataset."""
  from moe.data import sources  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds_mnist5k"))
  sources.load_builder("mnist5k", data_dir)
  return data_dir
