"""Training-loop throughput with host (tf.data) vs device-resident data, side by side.

  python tools/benchmark_placement.py                       # CSS demo config (tirg_css:cpu)
  python tools/benchmark_placement.py --steps 20 --rounds 3 --config_arg cpu,res=32

Both placements run the trainer's own step (cir_jax.train.make_train_step) on the
same CSS split (NumPy generator) from the same initial state; each round times
`--steps` steps of the loop as the trainer runs it (fetch the next host batch or
pass the device tables, dispatch, block only at the end), alternating host /
device because timings on a shared host drift; the median per placement is
reported with the ratio. Compilation is excluded (one warm-up step each).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchmark  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top

from cir_jax import experiment  # pylint: disable=g-import-not-at-top
from cir_jax.data import device_data  # pylint: disable=g-import-not-at-top
from cir_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from cir_jax.data import registry  # pylint: disable=g-import-not-at-top
from cir_jax.data.vocab import Vocabulary  # pylint: disable=g-import-not-at-top
from configs import tirg_css  # pylint: disable=g-import-not-at-top


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config_arg", default="cpu")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args(argv)
  config = tirg_css.get_config(args.config_arg)
  config.data.css_source = "numpy"
  mesh = experiment.make_mesh(config)
  quiet = lambda *_: None
  split = registry.load_split(config.data, "train", log=quiet)
  vocab = Vocabulary.build(split.texts)
  exp = experiment.build(config, mesh, vocab)
  b, length = config.batch_size, config.data.max_text_len
  host = pipeline.TrainPipeline(split, vocab, length, b, mesh, config.seed,
                                config.data.image_size, log=quiet)
  device = device_data.DeviceTrainData(split, vocab, length, b, mesh, config.seed, log=quiet)
  host_batches = host.batches(0)
  rates = benchmark.alternate_train_steps(
      exp, config.loss, mesh, {"host": (None, host_batches),
                               "device": (device, iter(lambda: device.tables, None))},
      b, args.rounds, args.steps)
  print(f"\nconfig tirg_css:{args.config_arg} ({config.model.image_encoder}, "
        f"{config.data.image_size}px, batch {b}), {jax.device_count()} {jax.default_backend()} "
        f"device(s), {args.steps} steps x {args.rounds} rounds, medians:")
  for name, rate in rates.items():
    print(f"  {name:6s} {rate:8.1f} examples/s")
  print(f"  device / host = {rates['device'] / rates['host']:.2f}")
  host_batches.close()
  return rates


if __name__ == "__main__":
  main()
