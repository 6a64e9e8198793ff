"""Runs `python -m cir_jax.train` on tiny CSS as a subprocess (for end-to-end tests).

All runs of one pytest session share a persistent XLA compilation cache under
the session's base temp dir, so only the first run pays for compiling the
(identical) train step and evaluation functions.
"""
import os
import pathlib
import subprocess
import sys

from cir_jax.data import css
from tests import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_CSS = dict(image_size=32, num_scenes=20, num_queries=50, seed=0)
# The session's shared run (conftest.tiny_css_run): long enough to be killed mid-way.
REFERENCE_STEPS = 200
REFERENCE_CHECKPOINT_EVERY = 20

CONFIG = """
from tests import fakes

def get_config(arg=None):
  c = fakes.tiny_config("tirg")
  c.data.data_dir = {data_dir!r}
  c.data.num_scenes, c.data.num_queries = {num_scenes}, {num_queries}
  c.num_train_steps = {steps}
  c.log_every_steps = 1
  c.checkpoint_every_steps = {every}
  c.eval_every_steps = 10_000
  return c
"""


def make_env(base: pathlib.Path, name: str, steps: int, checkpoint_every: int) -> dict:
  """Builds tiny CSS under `base` (once) and a config file under `base / name`.

  Returns:
    {'root': base / name, 'config': config file path, 'env': subprocess environment}.
  """
  root = base / name
  root.mkdir(parents=True, exist_ok=True)
  css.build_css(base / "tiny_css", **TINY_CSS)  # once per base dir (TFDS reuses it)
  config = root / "tiny_config.py"
  config.write_text(CONFIG.format(data_dir=str(base / "tiny_css"), steps=steps,
                                  every=checkpoint_every, num_scenes=TINY_CSS["num_scenes"],
                                  num_queries=TINY_CSS["num_queries"]))
  variables = dict(os.environ)
  variables.update({
      "PYTHONPATH": str(REPO),
      "XLA_FLAGS": xla_flags.for_devices(1),
      "JAX_COMPILATION_CACHE_DIR": str(base / "xla_cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
  })
  return {"root": root, "config": config, "env": variables}


def output_path(workdir) -> pathlib.Path:
  return pathlib.Path(str(workdir) + ".out")


def output(workdir) -> str:
  """The last lines of a run's stdout+stderr (for assertion messages)."""
  return output_path(workdir).read_text()[-3000:]


def start(env: dict, workdir, module="cir_jax.train", args=()) -> subprocess.Popen:
  """Starts `python -m module --config=... --workdir=... *args` (output to `<workdir>.out`)."""
  command = [sys.executable, "-m", module, f"--config={env['config']}",
             f"--workdir={workdir}", *args]
  log = open(output_path(workdir), "w")  # pylint: disable=consider-using-with
  return subprocess.Popen(command, cwd=REPO, env=env["env"], stdout=log,
                          stderr=subprocess.STDOUT)


def run(env: dict, workdir, timeout=600):
  """Trains to completion; asserts a zero exit status."""
  process = start(env, workdir)
  assert process.wait(timeout) == 0, output(workdir)
