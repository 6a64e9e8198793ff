"""The command-line flags shared by `cir_jax.train` and `cir_jax.evaluate`."""
from absl import flags
from ml_collections import config_flags


def define_flags():
  config_flags.DEFINE_config_file(
      "config", None, "Experiment config file, e.g. configs/tirg_css.py[:arg].", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
  flags.mark_flags_as_required(["config", "workdir"])
