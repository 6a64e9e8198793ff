"""Training-step throughput of a frozen-tower config with vs without cached features.

  python tools/benchmark_cached_features.py                  # Combiner stage 2, tiny CLIP, CPU
  python tools/benchmark_cached_features.py --batch 128 --steps 20 --rounds 5

Both runs use the trainer's own step (cir_jax.train.make_train_step) on the same
random split from the same initial state, data drawn inside the step: 'on the
fly' gathers uint8 pixels (device_data.DeviceTrainData) and runs the frozen CLIP
towers every step; 'cached' gathers the towers' features, computed once
(cir_jax/feature_cache.py, data.cache_frozen_features). Each round times
`--steps` steps as the trainer runs them (dispatch, block at the end),
alternating the two because timings on a shared host drift; the median per path
and the ratio are printed, and the one-time cost of computing the features.
Compilation is excluded (one warm-up step each). Timing only here, never in tests.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchmark  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top

from cir_jax import experiment  # pylint: disable=g-import-not-at-top
from cir_jax import feature_cache  # pylint: disable=g-import-not-at-top
from cir_jax.data import device_data  # pylint: disable=g-import-not-at-top
from cir_jax.data import random_data  # pylint: disable=g-import-not-at-top
from cir_jax.data.vocab import Vocabulary  # pylint: disable=g-import-not-at-top
from configs import combiner_cirr  # pylint: disable=g-import-not-at-top


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config_arg", default="tiny", help="configs/combiner_cirr.py argument")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--images", type=int, default=512, help="images in the random split")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args(argv)
  config = combiner_cirr.get_config(args.config_arg)
  config.batch_size = config.eval.batch_size = args.batch
  quiet = lambda *_: None
  mesh = experiment.make_mesh(config)
  split = random_data.random_split(num_images=args.images, num_queries=2 * args.images,
                                   image_size=config.data.image_size)
  vocab = Vocabulary.build(split.texts)
  exp = experiment.build(config, mesh, vocab)
  plan = feature_cache.resolve(config, exp.model, exp.variables, log=quiet)
  if plan is None:
    raise ValueError(f"combiner_cirr:{args.config_arg} has no cacheable frozen tower")
  b = config.batch_size
  pixels = device_data.DeviceTrainData(split, vocab, config.data.max_text_len, b, mesh,
                                       config.seed, log=quiet)
  start = time.perf_counter()
  cached = feature_cache.build_train_data(plan, exp, split, vocab, None, log=quiet,
                                          placement="device")
  jax.block_until_ready(cached.tables)
  feature_s = time.perf_counter() - start
  rates = benchmark.alternate_train_steps(
      exp, config.loss, mesh, {name: (data, iter(lambda d=data: d.tables, None))
                               for name, data in (("on the fly", pixels), ("cached", cached))},
      b, args.rounds, args.steps)
  print(f"\nconfig combiner_cirr:{args.config_arg} ({config.model.image_encoder} + "
        f"{config.model.text_encoder}, frozen; {config.data.image_size}px, batch {b}), "
        f"{jax.device_count()} {jax.default_backend()} device(s), {args.steps} steps x "
        f"{args.rounds} rounds, medians:")
  for name, rate in rates.items():
    print(f"  {name:10s} {rate:8.1f} examples/s")
  ratio = rates["cached"] / rates["on the fly"]
  print(f"  cached / on the fly = {ratio:.2f}")
  print(f"  features of {split.num_images} images + {split.num_queries} texts computed once in "
        f"{feature_s:.1f} s (incl. compiling)")
  return {**rates, "ratio": ratio, "feature s": feature_s}


if __name__ == "__main__":
  main()
