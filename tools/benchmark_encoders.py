"""Benchmarks CLIP ViT forward+backward throughput: float32 vs bf16, with and without remat.

Each configuration runs in its own subprocess so that the process max RSS is its
own peak memory. Per configuration it reports compile time (`lower().compile()`
alone), XLA's FLOP count (`compiled.cost_analysis()`), XLA's temp buffer size
(`compiled.memory_analysis()`, where remat shows), step time and examples/s,
and the achieved FLOP rate as a fraction of a measured matmul peak.

  python tools/benchmark_encoders.py                          # B/32, batch 32, 224 px
  python tools/benchmark_encoders.py --batch 8 --steps 2      # quicker
  python tools/benchmark_encoders.py --variant clip_vit_tiny --image_size 32

Random initialisation; the loss is a scalar of the embedding and all tokens so
the backward pass covers the whole tower. Timings on a shared host swing; compare
rows of one run.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = {
    "f32": {"dtype": "float32", "remat": False},
    "bf16": {"dtype": "bfloat16", "remat": False},
    "f32_remat": {"dtype": "float32", "remat": True},
    "bf16_remat": {"dtype": "bfloat16", "remat": True},
}


def _parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="clip_vit_b32",
                      help="a key of cir_jax.models.clip.VISION_PRESETS")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--image_size", type=int, default=None,
                      help="input pixels (default: the preset's image_size)")
  parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
  parser.add_argument("--configs", default=",".join(CONFIGS),
                      help=f"comma-separated subset of {sorted(CONFIGS)}")
  parser.add_argument("--peak_size", type=int, default=2048,
                      help="matmul side for measuring peak FLOP/s (0 = skip)")
  parser.add_argument("--json", default=None, help="also write the results to this file")
  parser.add_argument("--single", default=None, help=argparse.SUPPRESS)  # child mode
  return parser.parse_args(argv)


def _max_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax returned one dict per device
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def run_single(args) -> dict:
  """Benchmarks one configuration in this process and returns its numbers."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from cir_jax.models import clip  # pylint: disable=g-import-not-at-top

  config = CONFIGS[args.single]
  preset = clip.VISION_PRESETS[args.variant]
  size = args.image_size or preset().image_size
  model = preset(image_size=size, dtype=jnp.dtype(config["dtype"]), remat=config["remat"])
  images = jnp.asarray(np.random.default_rng(0).standard_normal((args.batch, size, size, 3)),
                       jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), images[:1])["params"]

  def loss_fn(params, images):
    embedding, aux = model.apply({"params": params}, images)
    return jnp.mean(embedding**2) + jnp.mean(aux["last_hidden_state"]**2)

  step = jax.jit(jax.value_and_grad(loss_fn))
  lowered = step.lower(params, images)
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  temp_mb = getattr(memory, "temp_size_in_bytes", float("nan")) / 2**20
  flops = _flops(compiled)

  jax.block_until_ready(compiled(params, images))  # warm-up
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, images))
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
  return {"config": args.single, "variant": args.variant, "batch": args.batch,
          "image_size": size, "backend": jax.default_backend(), "compile_s": compile_s,
          "step_s": step_s, "step_s_all": times, "examples_per_s": args.batch / step_s,
          "xla_gflops_per_step": flops / 1e9, "achieved_gflops_per_s": flops / 1e9 / step_s,
          "xla_temp_mb": temp_mb, "max_rss_mb": _max_rss_mb()}


def measure_peak(size: int) -> float:
  """GFLOP/s of a float32 [size, size] matmul, best of 5 (the machine's practical peak)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(matmul(a, a))
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, a))
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best / 1e9


def main(argv=None):
  args = _parse(argv)
  if args.single:
    print(json.dumps(run_single(args)))
    return
  names = [c for c in args.configs.split(",") if c]
  unknown = set(names) - set(CONFIGS)
  if unknown:
    raise SystemExit(f"unknown --configs {sorted(unknown)}; valid: {sorted(CONFIGS)}")
  peak = measure_peak(args.peak_size) if args.peak_size else float("nan")
  print(f"measured float32 matmul peak: {peak:.1f} GFLOP/s ({args.peak_size}^2)", flush=True)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
  results = []
  for name in names:
    child = [sys.executable, os.path.abspath(__file__), "--single", name,
             "--variant", args.variant, "--batch", str(args.batch), "--steps", str(args.steps)]
    if args.image_size:
      child += ["--image_size", str(args.image_size)]
    out = subprocess.run(child, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
      raise SystemExit(f"config {name} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["fraction_of_peak"] = result["achieved_gflops_per_s"] / peak
    results.append(result)
    print(f"{name:11s} compile {result['compile_s']:6.1f} s | step {result['step_s']:7.3f} s | "
          f"{result['examples_per_s']:7.2f} ex/s | XLA {result['xla_gflops_per_step']:8.1f} "
          f"GFLOP/step, {result['achieved_gflops_per_s']:6.1f} GFLOP/s "
          f"({100 * result['fraction_of_peak']:.0f}% of peak) | XLA temp "
          f"{result['xla_temp_mb']:7.1f} MiB | max RSS {result['max_rss_mb']:7.1f} MiB",
          flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"peak_gflops_per_s": peak, "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
