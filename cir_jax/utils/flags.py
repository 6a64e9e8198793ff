"""The command-line flags shared by `cir_jax.train` and `cir_jax.evaluate`."""
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
  `creates_workdir` (training) a missing workdir is created first (a bad one is
  named before anything is written). Exits 0, or preemption.EXIT_PREEMPTED when a
  signal stopped training (`fn` returned {'preempted': True, ...})."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from cir_jax.utils import logging as log_lib  # pylint: disable=g-import-not-at-top
  define_flags()

  def main(argv):
    del argv
    from cir_jax import preemption  # pylint: disable=g-import-not-at-top
    from cir_jax.utils import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    workdir = workdir_lib.check_workdir(flags.FLAGS.workdir, create=creates_workdir)
    log_lib.quiet_console(workdir)
    # absl's app.run passes what main returns to sys.exit: None (0) or EXIT_PREEMPTED.
    return preemption.exit_status(fn(flags.FLAGS.config, flags.FLAGS.workdir))

  app.run(main)
