"""The command-line flags shared by `cir_jax.train` and `cir_jax.evaluate`."""
from absl import flags
from ml_collections import config_flags


def define_flags():
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file, e.g. configs/tirg_css.py[:arg].", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
  flags.mark_flags_as_required(["config", "workdir"])


def run(fn):
  """Defines the flags and runs `fn(config, workdir)` as an absl app (the `__main__` of
  cir_jax.train and cir_jax.evaluate)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  define_flags()

  def main(argv):
    del argv
    fn(flags.FLAGS.config, flags.FLAGS.workdir)  # absl would sys.exit() a returned value

  app.run(main)
