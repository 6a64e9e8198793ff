"""Alternated A/B/A/B of our train step under several conv lowerings, in one process.

  python tools/benchmark_ab.py --size 64 --conv_impl matmul,mixed,xla --rounds 3

Compiles one TIRG ResNet-18 step per lowering (tools/benchmark.py's
`build_train_step`), then runs `--steps` steps of each per round, reversing the
order every other round, so drift of a shared machine hits all of them. Prints
examples/s (median, min, max over all timed steps) and the median process CPU
seconds per step: on a loaded machine CPU time tracks the work done better
than wall time. Timing only here, never in tests.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchmark  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--conv_impl", default="matmul,mixed")
  parser.add_argument("--image_encoder", default="resnet18")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args(argv)
  variants = args.conv_impl.split(",")
  built = {}
  for v in variants:
    compiled, state, batches, compile_s, flops, temp_mb, _ = benchmark.build_train_step(
        image_encoder=args.image_encoder, conv_impl=v, batch=args.batch,
        image_size=args.size, devices=1)
    for _ in range(2):
      state, metrics = compiled(state, next(batches))
    jax.block_until_ready(metrics)
    built[v] = [compiled, state, batches]
    print(f"{v}: compile {compile_s:.1f} s, XLA GFLOP/step {flops / 1e9:.1f}, "
          f"temp {temp_mb:.0f} MB", flush=True)
  wall = {v: [] for v in variants}
  cpu = {v: [] for v in variants}
  for r in range(args.rounds):
    for v in (variants if r % 2 == 0 else variants[::-1]):
      compiled, state, batches = built[v]
      for _ in range(args.steps):
        batch = next(batches)
        t, c = time.perf_counter(), time.process_time()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        wall[v].append(time.perf_counter() - t)
        cpu[v].append(time.process_time() - c)
      built[v][1] = state
    print(f"round {r}: " + ", ".join(
        f"{v} {args.batch / statistics.median(wall[v][-args.steps:]):.2f} ex/s" for v in variants)
          + f"; load {os.getloadavg()[0]:.2f}", flush=True)
  for v in variants:
    w = wall[v]
    print(f"{v:8s} ex/s median {args.batch / statistics.median(w):6.2f} "
          f"(min {args.batch / max(w):.2f}, max {args.batch / min(w):.2f}), "
          f"CPU s/step median {statistics.median(cpu[v]):.2f}")
  print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
