"""Where one train step's time goes: XLA:CPU thunks grouped by what they compute.

  taskset -c 1 python tools/profile_train_step.py --size 64 --conv_impl auto --steps 2

Compiles our TIRG step (tools/benchmark.py's `build_train_step`), runs it under
`jax.profiler.trace`, reads the Perfetto trace back and maps every XLA thunk to
the compiled module's HLO: a library fusion holding a `convolution` or a `dot`
is reported as 'conv' / 'dot' with its output shape and window / contracting
dims, other thunks by their fusion kind (concatenate, transpose_copy_fusion,
...). Prints ms per step and the share of each group, then the slowest thunks.

Pin the process to one core (`taskset -c N`) to make the times add up to the
step: on several cores XLA:CPU's thunk executor runs independent thunks
concurrently, so their wall times overlap. docs/benchmarks.md has the tables
this produced. Timing only here, never in tests.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchmark  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top

# Trace events that are not XLA thunks (host-side Python, the executor itself).
_NOT_A_THUNK = re.compile(r"^(\$|end: )|::|PjitFunction|PjRt|Execute|Await")


def _describe(line: str):
  """'conv f32[..] window=...' / 'dot f32[..] lhs_contracting_dims=...' for an HLO line, else None."""
  op = re.search(r"= (\S+) (convolution|dot)\(.*?\)(.*)", line)
  if not op:
    return None
  dims = re.search(r"(window=\{[^}]*\}|lhs_contracting_dims=\{[^}]*\})", op.group(3))
  kind = "conv" if op.group(2) == "convolution" else "dot"
  return f"{kind} {op.group(1)} {dims.group(1) if dims else ''}".strip()


def fusion_contents(hlo_text: str) -> dict:
  """{instruction name: 'conv f32[..] window=...' | 'dot f32[..] lhs_contracting_dims=...'}
  for every fusion / custom call of the module whose called computation holds one (YNNPACK's
  library fusions), and for every convolution or dot instruction by its own name: Eigen's run
  as their own thunks; those inside fused computations never show up in a trace."""
  bodies = {m.group(1): m.group(2) for m in re.finditer(
      r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo_text, re.S | re.M)}
  contents = {}
  for m in re.finditer(r"%?([\w.\-]+) = [^\n]*?(?:fusion|custom-call)\([^\n]*?calls=%?([\w.\-]+)",
                       hlo_text):
    for line in bodies.get(m.group(2), "").splitlines():
      what = _describe(line)
      if what:
        contents[m.group(1)] = what
        break
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = ([^\n]*)", hlo_text, re.M):
    what = _describe("= " + m.group(2))
    if what and m.group(1) not in contents:
      contents[m.group(1)] = what
  return contents


def thunk_times(trace_dir: str) -> dict:
  """{thunk name: total microseconds} from the newest Perfetto trace jax.profiler wrote
  under trace_dir (a reused --trace_dir holds one per run)."""
  files = glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no Perfetto trace (*.json.gz) under {trace_dir}")
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  totals = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e and not _NOT_A_THUNK.search(e["name"]):
      totals[e["name"]] += e["dur"]
  return totals


def group(totals: dict, contents: dict, steps: int):
  """(groups [(name, ms/step, share)], thunks [(ms/step, name, what)]), slowest first."""
  total = sum(totals.values()) or 1.0
  groups = collections.Counter()
  thunks = []
  for name, us in totals.items():
    what = contents.get(name, "")
    key = what.split(" ")[0] if what else re.sub(r"[.]\d+$", "", name)
    groups[key] += us
    thunks.append((us / 1e3 / steps, name, what))
  return ([(k, v / 1e3 / steps, v / total) for k, v in groups.most_common()],
          sorted(thunks, reverse=True))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--conv_impl", default="auto")
  parser.add_argument("--image_encoder", default="resnet18")
  parser.add_argument("--embed_dim", type=int, default=512)
  parser.add_argument("--steps", type=int, default=2, help="traced steps (after 2 warm-up steps)")
  parser.add_argument("--top", type=int, default=25, help="slowest thunks to list")
  parser.add_argument("--trace_dir", default=None, help="keep the trace here (default: a temp dir)")
  args = parser.parse_args(argv)
  compiled, state, batches, _, flops, temp_mb, _ = benchmark.build_train_step(
      image_encoder=args.image_encoder, conv_impl=args.conv_impl, batch=args.batch,
      image_size=args.size, devices=1, embed_dim=args.embed_dim)
  for _ in range(2):
    state, metrics = compiled(state, next(batches))
  jax.block_until_ready(metrics)
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="cir_jax_profile_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(args.steps):
      state, metrics = compiled(state, next(batches))
      jax.block_until_ready(metrics)
  groups, thunks = group(thunk_times(trace_dir), fusion_contents(compiled.as_text()), args.steps)
  step_ms = sum(ms for _, ms, _ in groups)
  print(f"{args.image_encoder} {args.size}px batch {args.batch} conv_impl={args.conv_impl}: "
        f"thunks {step_ms:.1f} ms/step, XLA GFLOP/step {flops / 1e9:.2f}, temp {temp_mb:.0f} MB, "
        f"{os.cpu_count()} CPUs visible, sched_getaffinity {len(os.sched_getaffinity(0))}")
  print("| op group | ms/step | share |\n|---|---|---|")
  for name, ms, share in groups:
    print(f"| {name} | {ms:.1f} | {100 * share:.1f}% |")
  print(f"\nslowest {args.top} thunks (ms/step):")
  for ms, name, what in thunks[:args.top]:
    print(f"{ms:9.2f}  {name:32s} {what}")
  return groups


if __name__ == "__main__":
  main()
