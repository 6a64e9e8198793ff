"""Writes the two CIRR test1 submission files from a trained workdir.

  python tools/cirr_submission.py --config configs/tirg_cirr.py --workdir runs/tirg_cirr \
      --out_dir runs/tirg_cirr/submission

restores the newest checkpoint, embeds cirr/test1 (data.manual_dir must hold the
test1 images), writes test1_pred_ranks_recall.json (top 50, reference excluded)
and test1_pred_ranks_recall_subset.json (top 3 of img_set.members minus the
reference), validates both against the annotations and prints their paths.
Upload them to the CIRR evaluation server.
"""
import pathlib
import sys

from absl import app
from absl import flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from cir_jax import cirr_submission  # pylint: disable=wrong-import-position
from cir_jax import evaluate  # pylint: disable=wrong-import-position
from cir_jax import experiment  # pylint: disable=wrong-import-position
from cir_jax.data import cirr  # pylint: disable=wrong-import-position
from cir_jax.utils import flags as flags_lib  # pylint: disable=wrong-import-position
from cir_jax.utils import logging as log_lib  # pylint: disable=wrong-import-position

flags.DEFINE_string("out_dir", "", "where to write the two files (default <workdir>/submission)")


def main(argv):
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config.data.name != "cirr":
    raise ValueError(f"--config must be a CIRR config, got data.name={config.data.name!r}")
  log = log_lib.Logger(workdir)
  exp, step = experiment.restore_for_evaluation(config, workdir, log)
  evaluator = evaluate.Evaluator(config, exp.model, exp.vocab, exp.mesh, split="test1", log=log)
  top, subset = cirr_submission.predict(evaluator.embed_queries(exp.variables),
                                        evaluator.embed_gallery(exp.variables), evaluator.split,
                                        exp.mesh)
  recall, recall_subset = cirr_submission.make_submission(evaluator.split, top, subset)
  cirr_submission.validate_submission(
      recall, recall_subset, cirr.load_annotations(config.data.manual_dir, "test1"),
      list(cirr.load_image_split(config.data.manual_dir, "test1")))
  paths = cirr_submission.write_submission(
      flags.FLAGS.out_dir or pathlib.Path(workdir) / "submission", recall, recall_subset)
  log(f"step {step}: wrote {paths['recall']} and {paths['recall_subset']} (validated)")


if __name__ == "__main__":
  flags_lib.define_flags()
  app.run(main)
