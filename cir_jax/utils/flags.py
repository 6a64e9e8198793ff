"""The command-line flags shared by `cir_jax.train` and `cir_jax.evaluate`."""
import pathlib

from absl import flags
from ml_collections import config_flags


def define_flags():
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file, e.g. configs/tirg_css.py[:arg].", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
  flags.mark_flags_as_required(["config", "workdir"])


def run(fn, creates_workdir: bool = False):
  """Defines the flags and runs `fn(config, workdir)` as an absl app (the `__main__` of
  cir_jax.train and cir_jax.evaluate). The console gets our progress lines, tables
  and warnings; libraries' INFO lines go to `<workdir>/detail.log`. With
  `creates_workdir` (training) a missing workdir is created first."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from cir_jax.utils import logging as log_lib  # pylint: disable=g-import-not-at-top
  define_flags()

  def main(argv):
    del argv
    workdir = flags.FLAGS.workdir
    if creates_workdir and workdir and not pathlib.Path(workdir).exists():
      pathlib.Path(workdir).mkdir(parents=True)
    log_lib.quiet_console(workdir)
    fn(flags.FLAGS.config, flags.FLAGS.workdir)  # absl would sys.exit() a returned value

  app.run(main)
