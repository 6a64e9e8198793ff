"""Accelerator check: one prepared script (<= 9 minutes) that ends with a table.

Runs on a bare accelerator machine: JAX (+CUDA or TPU), flax, optax, orbax and
ml_collections (a carried wheel, see tools/device_check.sh), no TensorFlow, no
Pillow, no network. CSS comes from the NumPy generator (data.css_source='numpy'),
training data live on the device (data.placement='device').

  python tools/device_check.py                   # the full check (GPU/TPU), <= 9 min
  python tools/device_check.py --tiny            # CPU smoke test (tests/test_device_check.py)
  bash tools/device_check.sh                     # installs wheels/ml_collections first

Sections (each row: examples/s, step ms, compile s, TFLOP per step from XLA's
cost analysis, MFU = achieved FLOP/s over the devices' dense bf16 peak, XLA's
program memory of one device and the device's peak bytes in use so far):
  1. TIRG / ResNet-18 train step at 224 px, batch 32 and 256, float32 and bfloat16;
  2. a CLIP ViT-B/32 Combiner step (CLIP4Cir stage 2, frozen towers) at batch 1024
     with the global temperature cross-entropy, random weights;
  3. exact gallery top-50 of 10k queries over 100k x 512 (cir_jax.retrieval.gallery_topk);
  4. the CSS config's step (what sizes the runs below), then a short CSS run of
     TIRG (last conv), Concat and image-only, 3 seeds each (tools/reproduce_css.py),
     steps sized to the time left, with R@1 mean +- std.
The peak is the chip's published dense bf16 peak where the device kind is known
(--peak_tflops overrides it), else a measured bf16 matmul (labelled 'measured').
"""
import argparse
import os
import pathlib
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from cir_jax import experiment  # pylint: disable=g-import-not-at-top
from cir_jax import retrieval  # pylint: disable=g-import-not-at-top
from cir_jax.data.vocab import Vocabulary  # pylint: disable=g-import-not-at-top
from cir_jax.data import random_data  # pylint: disable=g-import-not-at-top
from configs import combiner_cirr  # pylint: disable=g-import-not-at-top
from configs import common  # pylint: disable=g-import-not-at-top
from tools import benchmark  # pylint: disable=g-import-not-at-top
from tools import benchmark_retrieval  # pylint: disable=g-import-not-at-top
from tools import css_table  # pylint: disable=g-import-not-at-top
from tools import reproduce_css  # pylint: disable=g-import-not-at-top

# Dense bf16 peak FLOP/s per chip (vendor data sheets), matched on jax's device_kind.
BF16_PEAK = (("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("l4", 121e12),
             ("a10", 125e12), ("v6", 918e12), ("v5p", 459e12), ("v5", 197e12),
             ("v4", 275e12))
CSS_METHODS = ("tirg_lastconv", "concat", "image_only")
COLUMNS = ("examples/s", "step ms", "compile s", "TFLOP/step", "MFU %", "program MB",
           "device peak MB")


def chip_peak(args) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number comes from)."""
  if args.peak_tflops:
    return args.peak_tflops * 1e12, "--peak_tflops"
  kind = jax.devices()[0].device_kind.lower()
  for name, peak in BF16_PEAK:
    if name in kind and jax.default_backend() != "cpu":
      return peak, f"{jax.devices()[0].device_kind} dense bf16 data sheet"
  n = 256 if args.tiny else 2048
  return benchmark.measure_peak_flops(n=n, repeats=3, dtype=jnp.bfloat16), (
      f"measured ({n}^3 bf16 matmul)")


class Check:
  """Collects rows, keeps the deadline, prints the table."""

  def __init__(self, args):
    self.args, self.start = args, time.perf_counter()
    self.deadline = self.start + args.budget_s
    self.mesh = experiment.make_mesh(self._mesh_config())
    self.peak, self.peak_source = chip_peak(args)
    self.rows: list[tuple[str, dict]] = []
    self.css_lines: list[str] = []

  def _mesh_config(self):
    c = common.base_config()
    c.batch_size = c.eval.batch_size = jax.device_count()
    return c

  def left(self) -> float:
    return self.deadline - time.perf_counter()

  def say(self, text: str):
    print(f"[device_check {time.perf_counter() - self.start:6.1f}s] {text}", flush=True)

  def add(self, name: str, r: dict):
    step_s = r["step ms"] / 1e3
    r = dict(r, **{"TFLOP/step": r["flops"] / 1e12,
                   "MFU %": 100 * r["flops"] / step_s / (self.peak * self.mesh.size)})
    self.rows.append((name, r))
    self.say(f"{name}: " + ", ".join(f"{k} {r.get(k, float('nan')):.4g}" for k in COLUMNS))

  def skip(self, name: str, why: str):
    self.rows.append((name, {"skipped": why}))
    self.say(f"{name}: skipped ({why})")

  def table(self) -> str:
    lines = ["| setting | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    for name, r in self.rows:
      if "skipped" in r:
        lines.append(f"| {name} | skipped: {r['skipped']} |" + " |" * (len(COLUMNS) - 1))
      else:
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4g}" for k in COLUMNS) + " |")
    return "\n".join(lines)


def _config(base, **fields):
  for key, value in fields.items():
    node, *path = base, *key.split(".")
    *parents, last = path
    for p in parents:
      node = node[p]
    node[last] = value
  return base


def tirg_rows(check: Check):
  """Section 1: TIRG / ResNet-18 train steps."""
  a = check.args
  size, encoder = (32, "resnet_tiny") if a.tiny else (224, "resnet18")
  batches = (8,) if a.tiny else (32, 256)
  dtypes = ("bfloat16",) if a.tiny else ("float32", "bfloat16")
  for batch in batches:
    for dtype in dtypes:
      name = f"TIRG/{encoder} {size}px b{batch} {dtype}"
      if check.left() < a.reserve_s:
        check.skip(name, "time")
        continue
      c = _config(common.base_config(), **{
          "model.composer": "tirg", "model.image_encoder": encoder, "model.dtype": dtype,
          "batch_size": batch, "eval.batch_size": batch, "data.image_size": size,
          "data.max_text_len": 8})
      check.add(name, benchmark.bench_config(c, check.mesh, a.warmup, a.steps))


def combiner_row(check: Check):
  """Section 2: CLIP ViT-B/32 Combiner (stage 2) with the global contrastive loss."""
  a = check.args
  c = combiner_cirr.get_config("tiny" if a.tiny else None)
  batch = 8 if a.tiny else 1024
  c = _config(c, **{"batch_size": batch, "eval.batch_size": batch, "model.dtype": "bfloat16",
                    "loss.negatives": "global", "init_from": "",
                    "data.max_text_len": 16 if a.tiny else 77,
                    # random ids from a word vocabulary stand in for CLIP's tokenizer
                    "data.tokenizer": "vocab" if a.tiny else "random-ids"})
  name = (f"Combiner {c.model.image_encoder}+{c.model.text_encoder} {c.data.image_size}px "
          f"b{batch} bf16 {c.loss.name} global")
  if check.left() < a.reserve_s:
    check.skip(name, "time")
    return
  texts = random_data.random_split(num_images=2, num_queries=2 * batch).texts
  check.add(name, benchmark.bench_config(c, check.mesh, a.warmup, a.steps,
                                         vocab=Vocabulary.build(texts)))


def gallery_row(check: Check):
  """Section 3: exact top-50 over a sharded gallery."""
  a = check.args
  q, g, d = (64, 512, 16) if a.tiny else (10_000, 100_000, 512)
  name = f"gallery top-50 {q} x {g} x {d} f32"
  if check.left() < a.reserve_s:
    check.skip(name, "time")
    return
  ns = types.SimpleNamespace(queries=q, gallery=g, dim=d, k=50, block_size=1024, seed=0,
                             gallery_block_size=retrieval.GALLERY_BLOCK)
  queries, gallery = benchmark_retrieval._make_data(ns)  # pylint: disable=protected-access
  _, r = benchmark_retrieval._run_jax(ns, queries, gallery)  # pylint: disable=protected-access
  flops = float(r["xla_flops"] or 2.0 * q * g * d)
  check.add(name, {"examples/s": q / r["search_s"], "step ms": 1e3 * r["search_s"],
                   "compile s": r["compile_s"], "flops": flops * check.mesh.size,
                   "program MB": float("nan"),
                   "device peak MB": benchmark.device_peak_bytes() / 2**20})


def css_set_args(a) -> list[str]:
  """reproduce_css --set overrides: NumPy CSS, device-resident data (tiny sizes with --tiny)."""
  sets = ["data.css_source=numpy", "data.placement=device", "log_every_steps=100000"]
  if a.tiny:
    sets += ["data.image_size=32", "data.num_scenes=20", "data.num_queries=50",
             "model.image_encoder=resnet_tiny", "model.embed_dim=16", "model.word_dim=8",
             "model.text_hidden_dim=16", "batch_size=8", "eval.batch_size=16",
             "eval.block_size=8", "model.conv_impl=xla"]
  return sets


def css_runs(check: Check):
  """Section 4: the CSS config's step, then TIRG / Concat / image-only, several seeds."""
  a = check.args
  seeds = list(range(a.css_seeds))
  argv = ["--out", str(a.out / "css"), "--config_arg", "", "--settings", "3d",
          "--composers", ",".join(a.css_methods), "--seeds", ",".join(map(str, seeds))]
  for item in css_set_args(a):
    argv += ["--set", item]
  probe = reproduce_css.parse_args(argv + ["--steps", "1"])
  together = reproduce_css.together(seeds, probe.sequential_seeds)
  config = reproduce_css.make_config(probe, reproduce_css.METHODS_BY_NAME[a.css_methods[0]],
                                     "3d", 0, num_seeds=len(seeds) if together else 1).unlock()
  name = (f"CSS {config.model.composer}/{config.model.image_encoder} {config.data.image_size}px"
          f" b{config.batch_size} x{config.num_seeds} seeds (sizes the runs)")
  if check.left() < a.reserve_s:
    check.skip(name, "time")
    return
  r = benchmark.bench_config(config, check.mesh, a.warmup, a.steps)
  check.add(name, r)
  # Per run: compiling the step and the state's init (~1.5x the step's compile), the
  # evaluation's two encoders (~1x) and one pass over gallery + queries forward.
  runs = len(a.css_methods) * (1 if together else len(seeds))
  eval_items = 2 * config.data.num_queries
  fixed = 2.5 * r["compile s"] + eval_items / (3 * r["examples/s"])
  train_s = (check.left() - a.margin_s) / runs - fixed
  steps = int(np.clip(train_s / (r["step ms"] / 1e3), a.min_css_steps, a.max_css_steps))
  check.say(f"CSS: {runs} runs of {steps} steps (~{fixed:.0f} s fixed + {train_s:.0f} s "
            f"training each, {check.left():.0f} s left)")
  args = reproduce_css.parse_args(argv + ["--steps", str(steps)])
  records = reproduce_css.run_all(args)
  summary = css_table.aggregate(records)["3d"]
  lines = [f"CSS 3D->3D, {steps} steps x batch {config.batch_size}, {len(seeds)} seeds, "
           f"{config.data.image_size}px {config.model.image_encoder}, evaluated on "
           f"{records[0]['num_queries']} queries x {records[0]['num_gallery']} images",
           "| method | R@1 | R@5 | R@10 | R@50 | s/step |", "|---|---|---|---|---|---|"]
  for method in a.css_methods:
    entry = summary[method]
    cells = [f"{entry[k]['mean']:.1f} ± {entry[k]['std']:.1f}" if k in entry else "-"
             for k in ("R@1", "R@5", "R@10", "R@50")]
    sps = entry.get("seconds_per_step")
    lines.append(f"| {method} | " + " | ".join(cells)
                 + f" | {sps:.4f} |" if sps else f"| {method} | " + " | ".join(cells) + " | - |")
  check.css_lines = lines


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke test)")
  parser.add_argument("--budget_s", type=float, default=530.0,
                      help="wall-clock budget of the whole check (the table comes by then)")
  parser.add_argument("--reserve_s", type=float, default=30.0,
                      help="a benchmark section starts only with this much time left")
  parser.add_argument("--margin_s", type=float, default=20.0,
                      help="time kept free after the CSS runs")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per benchmark row")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="per-device peak (TFLOP/s) for MFU; 0 = data sheet or measured")
  parser.add_argument("--sections", default="tirg,combiner,gallery,css")
  parser.add_argument("--css_methods", default=",".join(CSS_METHODS))
  parser.add_argument("--css_seeds", type=int, default=3)
  parser.add_argument("--min_css_steps", type=int, default=20)
  parser.add_argument("--max_css_steps", type=int, default=20_000)
  parser.add_argument("--out", default="", help="directory of the CSS runs (default: a temp dir)")
  args = parser.parse_args(argv)
  args.sections = [s for s in args.sections.split(",") if s]
  args.css_methods = [m for m in args.css_methods.split(",") if m]
  bad = [m for m in args.css_methods if m not in reproduce_css.METHODS_BY_NAME]
  if bad:
    parser.error(f"unknown --css_methods {bad}; valid: {list(reproduce_css.METHODS_BY_NAME)}")
  if args.tiny:
    args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    args.min_css_steps = args.max_css_steps = min(args.max_css_steps, 2)
  args.out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="device_check_"))
  return args


SECTIONS = {"tirg": tirg_rows, "combiner": combiner_row, "gallery": gallery_row, "css": css_runs}


def main(argv=None) -> Check:
  args = parse_args(argv)
  check = Check(args)
  check.say(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} x "
            f"{jax.devices()[0].device_kind}, {jax.process_count()} process(es); peak "
            f"{check.peak / 1e12:.3g} TFLOP/s per device ({check.peak_source}); budget "
            f"{args.budget_s:.0f} s; CSS runs in {args.out}")
  for section in args.sections:
    if section not in SECTIONS:
      raise SystemExit(f"unknown section {section!r}; valid: {list(SECTIONS)}")
    SECTIONS[section](check)
  print(f"\n## device check: {jax.device_count()} x {jax.devices()[0].device_kind}, jax "
        f"{jax.__version__}, {time.strftime('%Y-%m-%d')}, {time.perf_counter() - check.start:.0f}"
        f" s; MFU against {check.peak / 1e12:.3g} TFLOP/s per device ({check.peak_source})\n")
  print(check.table())
  if check.css_lines:
    print("\n" + "\n".join(check.css_lines))
  sys.stdout.flush()
  return check


if __name__ == "__main__":
  main()
