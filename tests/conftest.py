"""Test set-up: 8 fake CPU devices, one compilation cache for the session, quiet TensorFlow."""
import atexit
import fcntl
import os
import shutil
import tempfile

from tests import xla_flags

# Must happen before jax is imported anywhere (tests/xla_flags.py: which flags and why).
os.environ.setdefault("XLA_FLAGS", xla_flags.for_devices(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Compile time dominates this suite: many tests (and the trainer subprocesses of the
# resume / preemption / multi-host tests, which inherit the environment) compile the
# same programs again. A persistent cache shared by the whole session, emptied at
# exit, lets each distinct program compile once. Results are unaffected: a hit
# returns the executable XLA built for the identical program.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="cir_jax_test_jit_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

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


@pytest.fixture(scope="session")
def tiny_css_run(tmp_path_factory):
  """One uninterrupted `python -m cir_jax.train` run on tiny CSS, shared by the session.

  The preemption tests compare interrupted runs with it (same config file, so the
  subprocesses hit its compilation cache) and the retrieve tool reads its workdir.
  Under pytest-xdist the run lives in the directory shared by all workers and the
  first worker to need it trains it (a file lock; the others wait and reuse it).

  Returns:
    (env, workdir): `env` from tests.train_subprocess.make_env; 200 steps,
    a checkpoint every 20 steps, results.json written.
  """
  from tests import train_subprocess as ts  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    base = base.parent  # the session's root; each worker's basetemp is a child of it
  base = base / "tiny_css_run"
  base.mkdir(exist_ok=True)
  with open(base / ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    env = ts.make_env(base, "run", steps=ts.REFERENCE_STEPS,
                      checkpoint_every=ts.REFERENCE_CHECKPOINT_EVERY)
    workdir = env["root"] / "uninterrupted"
    if not (workdir / "results.json").exists():
      ts.run(env, workdir)
  return env, workdir
