"""Shared fixtures. Tests run on the CPU with 8 fake devices so sharding can be exercised."""

import os

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Run the test body with 64-bit floats enabled."""
  with jax.enable_x64(True):
    yield
