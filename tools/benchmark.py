"""Throughput benchmark of the train step (and the machine's peak) on the current backend.

  python tools/benchmark.py                          # TIRG, ResNet-18, batch 32, 64 and 224 px
  python tools/benchmark.py --sizes 64 --composer concat --image_encoder resnet_small
  python tools/benchmark.py --negatives local,global --devices 8   # (with 8 fake CPU devices)
  python tools/benchmark.py --sizes 64 --steps_per_call 1,4    # steps per compiled call

Prints, per setting: examples/s and step time (median of timed steps), compile
time (separately), XLA-reported FLOPs per step (all devices: per-device cost x
devices) and the fraction of the machine's measured peak matmul FLOP/s they reach
(on CPU the fake devices share the cores, so the machine's peak is the one-device
peak; on accelerators it is devices x that), the compiled temp memory and the
process peak RSS. The data are device-resident (cir_jax/data/device_data.py): each
step draws its batch in the jitted step, so no input pipeline (and no TensorFlow)
is involved; `bench_config` is what tools/device_check.py reuses.
Timing only here, never in tests.
"""
import argparse
import itertools
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from cir_jax import experiment  # pylint: disable=g-import-not-at-top
from cir_jax import seeds  # pylint: disable=g-import-not-at-top
from cir_jax import train  # pylint: disable=g-import-not-at-top
from cir_jax.data import device_data  # pylint: disable=g-import-not-at-top
from cir_jax.data import random_data  # pylint: disable=g-import-not-at-top
from cir_jax.data.vocab import Vocabulary  # pylint: disable=g-import-not-at-top
from configs import common  # pylint: disable=g-import-not-at-top


def measure_peak_flops(n=2048, repeats=10, dtype=jnp.float32) -> float:
  """Best-of-`repeats` FLOP/s of an n x n x n matmul on the default device."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def max_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_peak_bytes() -> float:
  """Peak bytes in use on device 0 so far (accelerators), else NaN (CPU has no stats)."""
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  return float(stats.get("peak_bytes_in_use", float("nan")))


def alternate_train_steps(exp, loss_config, mesh, inputs: dict, batch_size: int, rounds: int,
                          steps: int) -> dict:
  """Median examples/s of the trainer's own step under several input paths, alternated.

  `inputs`: name -> (data, iterator): `data` is what the step draws its batch from
  inside the jitted step (a DeviceTrainData / FeatureTrainData; None for host
  batches) and `iterator` yields each step's inputs. Every path starts from
  `exp.state` and compiles with one untimed step; each round then times `steps`
  steps of every path in turn, as the trainer runs them (dispatch, block at the
  end), because timings on a shared host drift. Prints each round's rate.
  """
  init = jax.device_get(exp.state)
  shardings = jax.tree.map(lambda x: x.sharding, exp.state)
  width = max(map(len, inputs))
  runs = {}
  for name, (data, iterator) in inputs.items():
    step = train.make_train_step(exp.model, exp.tx, loss_config, mesh, data=data)
    state, metrics = step(jax.device_put(init, shardings), next(iterator))   # compiles
    jax.block_until_ready(metrics)
    runs[name] = [step, iterator, state, []]
  for _ in range(rounds):
    for name, run in runs.items():
      step, iterator, state, times = run
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = step(state, next(iterator))
      jax.block_until_ready(metrics)
      times.append((time.perf_counter() - start) / steps)
      run[2] = state
      print(f"{name:{width}s} round {len(times)}: {batch_size / times[-1]:.1f} examples/s",
            flush=True)
  return {name: batch_size / statistics.median(run[3]) for name, run in runs.items()}


def bench_config(config, mesh, warmup: int = 2, steps: int = 10, vocab=None) -> dict:
  """Compiles and times the train step of `config` on a random split (device-resident data).

  Returns {'examples/s', 'step ms', 'compile s', 'flops' (XLA cost analysis of the
  whole step: per-device cost x devices), 'program MB' (XLA's argument + output +
  temp bytes of one device's program), 'device peak MB', 'max RSS MB'}. `vocab`
  replaces the word vocabulary of the split's texts (random ids for full-size
  pretrained text towers). With config.num_seeds = S the step trains S replicas
  (examples/s counts all of them). With config.steps_per_call = K each timed call
  runs K steps ('step ms' is a call's time / K; `steps` counts calls).
  """
  b, size = config.batch_size, config.data.image_size
  split = random_data.random_split(num_images=2 * b, num_queries=2 * b, image_size=size)
  vocab = vocab or Vocabulary.build(split.texts)
  data = device_data.DeviceTrainData(split, vocab, config.data.max_text_len, b, mesh,
                                     config.seed, log=lambda *_: None,
                                     set_negatives=config.loss.get("set_negatives", 0))
  exp = experiment.build(config, mesh, vocab)
  state = exp.state
  num_seeds = seeds.num_seeds(config)
  k = config.get("steps_per_call", 1)
  step = train.make_train_step(exp.model, exp.tx, config.loss, mesh, data=data,
                               num_seeds=num_seeds, first_seed=config.seed, steps_per_call=k)
  t = time.perf_counter()
  compiled = step.lower(state, data.tables).compile()
  compile_s = time.perf_counter() - t
  flops = step_flops(compiled)
  memory = compiled.memory_analysis()
  program = sum(getattr(memory, f, 0) or 0 for f in (
      "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"))
  program -= getattr(memory, "alias_size_in_bytes", 0) or 0
  for _ in range(warmup):
    state, metrics = compiled(state, data.tables)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, data.tables)
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - t) / k)
  step_s = statistics.median(times)
  # cost_analysis() describes the partitioned per-device program: the step's total
  # is mesh.size times it.
  return {"examples/s": num_seeds * b / step_s, "step ms": 1e3 * step_s, "compile s": compile_s,
          "flops": flops * mesh.size, "program MB": program / 2**20,
          "device peak MB": device_peak_bytes() / 2**20, "max RSS MB": max_rss_mb()}


def step_flops(compiled) -> float:
  """XLA's FLOP count of one train step of a compiled call (per-device program).

  XLA's cost analysis counts a while loop's body once, whatever its trip count,
  so a call of K steps (one lax.scan) reports one step's FLOPs
  (tests/test_benchmarks.py checks K = 1 and K = 3 agree).
  """
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def build_train_step(composer="tirg", image_encoder="resnet18", dtype="float32",
                     conv_impl="auto", negatives="global", batch=32, image_size=64,
                     devices=0, text_len=8, loss="soft_triplet", embed_dim=512,
                     steps_per_call=1):
  """Compiles our train step on random data fed by the tf.data pipeline (host batches).

  With steps_per_call = K > 1 one call of the compiled step runs K steps and
  takes a tuple of K batches (cir_jax/train.py); its FLOPs are still per step.

  Returns:
    (compiled step, state, batch iterator, compile seconds, XLA FLOPs of one
    step of the per-device program, compiled temp MB, mesh).
  """
  from cir_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
  config = common.base_config()
  config.model.composer = composer
  config.model.image_encoder = image_encoder
  config.model.dtype = dtype
  config.model.conv_impl = conv_impl
  config.model.embed_dim = config.model.word_dim = config.model.text_hidden_dim = embed_dim
  config.loss.name = loss
  config.loss.negatives = negatives
  config.batch_size = config.eval.batch_size = batch
  config.data.image_size, config.data.max_text_len = image_size, text_len
  mesh = experiment.make_mesh(config, jax.devices()[:devices] if devices else None)
  split = random_data.random_split(num_images=4 * batch, num_queries=8 * batch,
                                   image_size=image_size)
  vocab = Vocabulary.build(split.texts)
  data = pipeline.TrainPipeline(split, vocab, text_len, batch, mesh, 0, image_size)
  exp = experiment.build(config, mesh, vocab)
  batches = data.batches(0)
  step = train.make_train_step(exp.model, exp.tx, config.loss, mesh,
                               steps_per_call=steps_per_call)
  example = train.call_inputs(itertools.repeat(next(batches)), steps_per_call)
  t = time.perf_counter()
  compiled = step.lower(exp.state, example).compile()
  compile_s = time.perf_counter() - t
  flops = step_flops(compiled)
  memory = compiled.memory_analysis()
  temp_mb = getattr(memory, "temp_size_in_bytes", 0) / 2**20
  return compiled, exp.state, batches, compile_s, flops, temp_mb, mesh


def bench_train_step(args, image_size: int, negatives: str, conv_impl: str, peak: float,
                     steps_per_call: int = 1) -> dict:
  config = common.base_config()
  config.model.composer = args.composer
  config.model.image_encoder = args.image_encoder
  config.model.dtype = args.dtype
  config.model.conv_impl = conv_impl
  config.loss.negatives = negatives
  config.steps_per_call = steps_per_call
  config.batch_size = config.eval.batch_size = args.batch
  config.data.image_size, config.data.max_text_len = image_size, 8
  mesh = experiment.make_mesh(config, jax.devices()[:args.devices] if args.devices else None)
  r = bench_config(config, mesh, args.warmup, args.steps)
  # The peak was measured on one device; fake CPU devices share the same cores (one
  # device's matmul already uses all of them), so on CPU that is the machine's
  # peak, while accelerators each add their own.
  machine_peak = peak if jax.default_backend() == "cpu" else peak * mesh.size
  return {"setting": f"{args.composer}/{args.image_encoder} {image_size}px b{args.batch} "
                     f"{args.dtype} {negatives} conv={conv_impl} x{mesh.size}dev "
                     f"K={steps_per_call}",
          "examples/s": r["examples/s"], "step ms": r["step ms"], "compile s": r["compile s"],
          "GFLOP/step": r["flops"] / 1e9,
          "% of peak": 100 * r["flops"] / (r["step ms"] / 1e3) / machine_peak,
          "program MB": r["program MB"], "max RSS MB": r["max RSS MB"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="64,224", help="image sizes, comma separated")
  parser.add_argument("--composer", default="tirg")
  parser.add_argument("--image_encoder", default="resnet18")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--devices", type=int, default=0, help="0 = all")
  parser.add_argument("--negatives", default="global", help="global,local to compare")
  parser.add_argument("--conv_impl", default="auto",
                      help="ResNet conv lowerings to compare, e.g. auto,xla,matmul "
                           "(cir_jax/models/conv.py; the trainer's default is auto)")
  parser.add_argument("--steps_per_call", default="1",
                      help="train steps per compiled call to compare, e.g. 1,4 (cir_jax/train.py)")
  args = parser.parse_args()
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s), "
        f"{os.cpu_count()} CPU cores")
  peak = measure_peak_flops()
  print(f"measured peak: {peak / 1e9:.1f} GFLOP/s (float32 2048^3 matmul, best of 10)")
  rows = [bench_train_step(args, int(size), neg, impl, peak, int(k))
          for size in args.sizes.split(",") for neg in args.negatives.split(",")
          for impl in args.conv_impl.split(",") for k in args.steps_per_call.split(",")]
  keys = list(rows[0])
  print("| " + " | ".join(keys) + " |")
  print("|" + "---|" * len(keys))
  for r in rows:
    print("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k])
                            for k in keys) + " |")


if __name__ == "__main__":
  main()
