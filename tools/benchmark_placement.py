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
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # pylint: disable=g-import-not-at-top

from cir_jax import experiment  # pylint: disable=g-import-not-at-top
from cir_jax import train  # pylint: disable=g-import-not-at-top
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
  init = jax.device_get(exp.state)
  shardings = jax.tree.map(lambda x: x.sharding, exp.state)
  b, length = config.batch_size, config.data.max_text_len
  host = pipeline.TrainPipeline(split, vocab, length, b, mesh, config.seed,
                                config.data.image_size, log=quiet)
  device = device_data.DeviceTrainData(split, vocab, length, b, mesh, config.seed, log=quiet)
  runs = {}
  for name, data in (("host", None), ("device", device)):
    step = train.make_train_step(exp.model, exp.tx, config.loss, mesh, data=data)
    inputs = host.batches(0) if data is None else iter(lambda: device.tables, None)
    state = jax.device_put(init, shardings)
    state, metrics = step(state, next(inputs))   # compiles
    jax.block_until_ready(metrics)
    runs[name] = [step, inputs, state, []]
  for _ in range(args.rounds):
    for name, run in runs.items():
      step, inputs, state, times = run
      start = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = step(state, next(inputs))
      jax.block_until_ready(metrics)
      times.append((time.perf_counter() - start) / args.steps)
      run[2] = state
      print(f"{name:6s} round {len(times)}: {b / times[-1]:.1f} examples/s", flush=True)
  print(f"\nconfig tirg_css:{args.config_arg} ({config.model.image_encoder}, "
        f"{config.data.image_size}px, batch {b}), {jax.device_count()} {jax.default_backend()} "
        f"device(s), {args.steps} steps x {args.rounds} rounds, medians:")
  rates = {n: b / statistics.median(r[3]) for n, r in runs.items()}
  for name, rate in rates.items():
    print(f"  {name:6s} {rate:8.1f} examples/s")
  print(f"  device / host = {rates['device'] / rates['host']:.2f}")
  runs["host"][1].close()
  return rates


if __name__ == "__main__":
  main()
