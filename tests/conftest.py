"""Test set-up: 8 fake CPU devices for sharding tests, quiet TensorFlow."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data():
  """Path of ../shared/data (real CIRR and FashionIQ annotation files)."""
  if not SHARED_DATA.is_dir():
    raise FileNotFoundError(f"expected the shared annotation files at {SHARED_DATA}")
  return SHARED_DATA
