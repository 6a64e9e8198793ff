"""Side-by-side train-step throughput: google/tirg's PyTorch code vs cir_jax, alternated.

  python tools/benchmark_vs_pytorch.py --tirg_dir /path/to/google/tirg --sizes 64,224

The PyTorch side imports google/tirg's own `img_text_composition_models.TIRG`
(ResNet-18 + LSTM + TIRG composer) from the checkout given by --tirg_dir and
runs its training iteration as its main.py does: `model.compute_loss(img1, mods,
img2, soft_triplet_loss=True)`, `zero_grad`, `backward`, SGD(momentum 0.9,
weight decay 1e-6) `step`, `float(loss)`. Nothing of theirs is copied here; their
Python-2-era code runs unchanged under today's PyTorch through runtime shims set
at import time (see `_apply_shims`): `.cuda()` is the identity on a CPU-only
torch, `range` in their module returns a list (Python 2's `range(n) + range(m)`),
their legacy autograd Function (non-static forward/backward) is called through a
new-style Function that runs their own forward/backward methods, and
`torchvision.models.resnet18(pretrained=True)` builds a randomly initialised
ResNet-18 (no download; the arithmetic is the same). Both sides cycle through
random batches made before timing (4 for google/tirg; 4, or 2 calls' worth of K,
from cir_jax's tf.data pipeline), so the train steps alone are compared: neither
input pipeline runs while the steps are timed.

The cir_jax side is `tools/benchmark.py`'s compiled train step (TIRG, ResNet-18,
soft triplet loss, `--conv_impl`), one call per step or, with `--steps_per_call K`,
K steps per call as the trainer runs them with config.steps_per_call = K (each
step on its own batch; a call's time / K is the step time, and `--steps` then
counts calls). Same batch, image size and number of threads:
each side runs in its own worker process pinned to the same `--threads` CPUs
(`os.sched_setaffinity`), with `torch.set_num_threads` and XLA's
`intra_op_parallelism_threads`. The parent alternates A/B/A/B: each round runs
`--warmup` untimed then `--steps` timed steps on one side, then on the other,
so drift of a shared machine hits both. Per side it prints examples/s
(batch / median step time of a round) as min/median/max over rounds, the ratio
of medians cir_jax / google/tirg (and the per-round ratios), and % of that
side's measured matmul peak (a 2048^3 float32 matmul in the same framework and
process, measured before the first round).

FLOPs per step for "% of peak" are the same number for both sides: PyTorch's
FlopCounterMode over one of their training iterations (forward + backward of
the reference and target images through ResNet-18, text and composer), i.e.
useful model FLOPs, so the percentages compare like with like. (XLA's own
count for our step is printed too; it includes im2col's extra work.)

Known difference in work: google/tirg's soft triplet loss samples 3 triplets
per anchor over [queries; targets] and computes them in NumPy loops; ours uses
every in-batch negative on device (cir_jax/losses.py). Both are negligible
next to the ResNet at these sizes.

Timing only here, never in tests (tests/test_benchmarks.py runs a tiny
stand-in model through the same code).
"""
import argparse
import builtins
import importlib
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
import types

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
SIDES = ("torch", "jax")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tirg_dir", required=True,
                      help="checkout of github.com/google/tirg (img_text_composition_models.py)")
  parser.add_argument("--sizes", default="64,224", help="image sizes, comma separated")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--rounds", type=int, default=3, help="A/B alternations per size")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
  parser.add_argument("--warmup", type=int, default=1, help="untimed steps per side per round")
  parser.add_argument("--conv_impl", default="auto", help="cir_jax conv lowering")
  parser.add_argument("--steps_per_call", type=int, default=1,
                      help="cir_jax train steps per compiled call (config.steps_per_call); "
                           "each timed cir_jax call then runs this many steps")
  parser.add_argument("--image_encoder", default="resnet18",
                      help="cir_jax image encoder (google/tirg's is ResNet-18; others for tests)")
  parser.add_argument("--embed_dim", type=int, default=512,
                      help="embedding, word and LSTM width (google/tirg: 512; small for tests)")
  parser.add_argument("--text_len", type=int, default=8, help="words per modification text")
  parser.add_argument("--peak_n", type=int, default=2048, help="matmul size for the peak")
  parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
  parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# Worker side. Reads commands ("run" / "quit") on stdin, answers JSON lines.


def _emit(obj):
  print("RESULT " + json.dumps(obj), flush=True)


def _words(rng, n, vocab=("red", "blue", "cube", "sphere", "add", "remove", "make", "small",
                          "large", "green", "to", "the", "top", "left", "object")):
  return " ".join(rng.choice(vocab) for _ in range(n))


class _LegacyFunctionAdapter:
  """Runs a legacy autograd Function class (instance forward/backward) as a new-style one.

  Their `forward(self, x)` / `backward(self, g)` are called unchanged, with
  `self` a plain namespace holding the constructor's attributes plus
  `save_for_backward` / `saved_tensors`.
  """

  def __init__(self, legacy_cls):
    import torch

    class Function(torch.autograd.Function):

      @staticmethod
      def forward(ctx, x, state):
        ctx.state = state
        return legacy_cls.forward(state, x)

      @staticmethod
      def backward(ctx, grad):
        return legacy_cls.backward(ctx.state, grad), None

    self.legacy_cls, self.function = legacy_cls, Function

  def __call__(self, *init_args):
    state = types.SimpleNamespace()
    # Their __init__ only sets attributes after super().__init__(); run it on the namespace.
    state.save_for_backward = lambda *t: setattr(state, "saved_tensors", t)
    init = self.legacy_cls.__init__
    saved_super = builtins.super
    builtins.super = lambda *a: types.SimpleNamespace(__init__=lambda *b, **c: None)
    try:
      init(state, *init_args)
    finally:
      builtins.super = saved_super
    return lambda x: self.function.apply(x, state)


def _import_torchvision():
  """Imports torchvision, tolerating a CUDA build whose C++ ops cannot load on CPU torch.

  The PyPI torchvision wheel links CUDA libraries; on a CPU-only torch its ops
  library does not load and registering fake kernels for those ops raises. The
  models (pure Python) do not need the ops, so that registration is skipped.
  """
  import torch
  import torch.library
  try:
    return importlib.import_module("torchvision")
  except RuntimeError:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
      del sys.modules[name]
  original = torch.library.register_fake

  def tolerant(op, func=None, /, **kwargs):
    if func is not None:
      try:
        return original(op, func, **kwargs)
      except RuntimeError:
        return func
    decorator = original(op, **kwargs)

    def register(f):
      try:
        return decorator(f)
      except RuntimeError:
        return f
    return register

  torch.library.register_fake = tolerant
  try:
    return importlib.import_module("torchvision")
  finally:
    torch.library.register_fake = original


def _apply_shims(tirg_dir):
  """Imports google/tirg's model module from `tirg_dir` with runtime shims; returns it."""
  import torch
  if not torch.cuda.is_available():
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
  if not os.path.isfile(os.path.join(tirg_dir, "img_text_composition_models.py")):
    raise SystemExit(f"--tirg_dir {tirg_dir!r} has no img_text_composition_models.py; pass a "
                     f"checkout of github.com/google/tirg")
  try:
    torchvision = _import_torchvision()
  except ImportError:
    torchvision = None
  if torchvision is not None:
    resnet18 = torchvision.models.resnet18

    def resnet18_random(*args, pretrained=False, **kwargs):
      del pretrained  # no download: random init has the same arithmetic
      kwargs.setdefault("weights", None)
      return resnet18(*args, **kwargs)
    torchvision.models.resnet18 = resnet18_random
  sys.path.insert(0, os.path.abspath(tirg_dir))
  models = importlib.import_module("img_text_composition_models")
  models.range = lambda *a: list(builtins.range(*a))  # Python 2: range(n) + range(m)
  functions = sys.modules.get("torch_functions")
  legacy = getattr(functions, "MyTripletLossFunc", None)
  if legacy is not None and not isinstance(legacy.__dict__.get("forward"), staticmethod):
    functions.MyTripletLossFunc = _LegacyFunctionAdapter(legacy)
  return models


def _torch_worker(args):
  import numpy as np
  import torch
  from torch.utils import flop_counter
  torch.set_num_threads(args.threads)
  models = _apply_shims(args.tirg_dir)
  rng = np.random.default_rng(0)
  texts = [_words(rng, args.text_len) for _ in range(8 * args.batch)]
  model = models.TIRG(texts, embed_dim=args.embed_dim)
  # main.py create_model_and_optimizer for css3d: one group, SGD momentum 0.9.
  optimizer = torch.optim.SGD([{"params": list(model.parameters())}], lr=1e-2, momentum=0.9,
                              weight_decay=1e-6)
  model.train()
  shape = (args.batch, 3, args.size, args.size)

  def batch():
    return (torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)),
            [texts[i] for i in rng.integers(0, len(texts), args.batch)],
            torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)))

  def step(data):  # main.py training_1_iter, minus the data-loader stacking
    img1, mods, img2 = data
    loss = model.compute_loss(img1, mods, img2, soft_triplet_loss=True)
    assert not torch.isnan(loss)
    float(loss.detach())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  counter = flop_counter.FlopCounterMode(display=False)
  with counter:
    step(batch())
  a = torch.ones(args.peak_n, args.peak_n)
  peak = _best_flops(lambda: torch.mm(a, a), args.peak_n)
  _emit({"peak_flops": peak, "flops_per_step": counter.get_total_flops(),
         "threads": torch.get_num_threads(), "version": torch.__version__})
  # Batches made before timing, as on the cir_jax side: the step alone is compared
  # (drawing 2 x 32 x 3 x 224 x 224 normals inside it would add ~0.2 s to theirs).
  ready = itertools.cycle([batch() for _ in range(4)])
  _serve(lambda: step(next(ready)), args)


def _jax_worker(args):
  sys.path.insert(0, os.path.join(REPO, "tools"))
  sys.path.insert(0, REPO)
  import jax
  import jax.numpy as jnp
  import benchmark  # tools/benchmark.py
  from cir_jax import train
  k = args.steps_per_call
  compiled, state, batches, compile_s, xla_flops, _, _ = benchmark.build_train_step(
      image_encoder=args.image_encoder, conv_impl=args.conv_impl, batch=args.batch,
      image_size=args.size, devices=1, text_len=args.text_len, embed_dim=args.embed_dim,
      steps_per_call=k)
  holder = {"state": state}

  # Batches from the tf.data pipeline, made before timing as on the torch side: one
  # call takes k of them, each step its own.
  ready = itertools.cycle([train.call_inputs(batches, k) for _ in range(4 if k == 1 else 2)])

  def step():
    holder["state"], metrics = compiled(holder["state"], next(ready))
    jax.block_until_ready(metrics)

  a = jnp.ones((args.peak_n, args.peak_n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  peak = _best_flops(lambda: matmul(a).block_until_ready(), args.peak_n)
  _emit({"peak_flops": peak, "xla_flops_per_step": xla_flops, "compile_s": compile_s,
         "version": jax.__version__})
  _serve(step, args, steps_per_call=k)


def _best_flops(fn, n, repeats=5):
  fn()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def _serve(step, args, steps_per_call=1):
  """Answers each "run" with the per-step times of `args.steps` timed calls of `step`
  (after `args.warmup` untimed ones); a call runs `steps_per_call` steps."""
  for line in sys.stdin:
    if line.strip() != "run":
      break
    for _ in range(args.warmup):
      step()
    times = []
    for _ in range(args.steps):
      t = time.perf_counter()
      step()
      times.append((time.perf_counter() - t) / steps_per_call)
    _emit({"times": times})


def worker(args):
  cpus = sorted(os.sched_getaffinity(0))[:args.threads]
  os.sched_setaffinity(0, cpus)
  (_torch_worker if args.worker == "torch" else _jax_worker)(args)


# ---------------------------------------------------------------------------
# Parent side.


class Worker:
  """One side's process: started once per image size, asked to `run` each round."""

  def __init__(self, side, args, size):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
      env[var] = str(args.threads)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true "
                        f"intra_op_parallelism_threads={args.threads}").strip()
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--size", str(size),
           "--tirg_dir", args.tirg_dir, "--batch", str(args.batch),
           "--threads", str(args.threads), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--conv_impl", args.conv_impl,
           "--steps_per_call", str(args.steps_per_call),
           "--image_encoder", args.image_encoder, "--embed_dim", str(args.embed_dim),
           "--text_len", str(args.text_len), "--peak_n", str(args.peak_n)]
    self.side = side
    self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
    self.info = self._read()

  def _read(self):
    for line in self.proc.stdout:
      if line.startswith("RESULT "):
        return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{self.side} worker exited with status {self.proc.wait()}")

  def run(self):
    self.proc.stdin.write("run\n")
    self.proc.stdin.flush()
    return self._read()["times"]

  def close(self):
    self.proc.stdin.write("quit\n")
    self.proc.stdin.close()
    self.proc.wait()


def summarize(rates: dict, batch: int, flops_per_step: float, peaks: dict) -> dict:
  """Statistics of alternated rounds.

  Args:
    rates: {'torch': [examples/s per round], 'jax': [...]}, equal lengths.
    batch: examples per step.
    flops_per_step: model FLOPs of one step (same for both sides).
    peaks: {side: measured matmul FLOP/s}.

  Returns:
    {side: {'min','median','max' examples/s, 'pct_peak' at the median},
     'ratio': median jax / median torch, 'round_ratios': jax/torch per round}.
  """
  out = {}
  for side, values in rates.items():
    med = statistics.median(values)
    out[side] = {"min": min(values), "median": med, "max": max(values),
                 "pct_peak": 100 * med / batch * flops_per_step / peaks[side]}
  out["ratio"] = out["jax"]["median"] / out["torch"]["median"]
  out["round_ratios"] = [j / t for j, t in zip(rates["jax"], rates["torch"])]
  return out


def compare(args, size, log=print):
  """Alternates the two sides for `args.rounds` rounds at one image size."""
  workers = {}
  try:
    for side in SIDES:  # start (and compile) one at a time: no overlap with timing
      workers[side] = Worker(side, args, size)
    rates = {side: [] for side in SIDES}
    for r in range(args.rounds):
      for side in (SIDES if r % 2 == 0 else SIDES[::-1]):  # A/B, B/A, ...
        times = workers[side].run()
        rates[side].append(args.batch / statistics.median(times))
        log(f"  {size}px round {r} {side:5s} {rates[side][-1]:7.2f} ex/s "
            f"(steps {', '.join(f'{t:.3f}' for t in times)} s)")
  finally:
    for w in workers.values():
      w.close()
  flops = workers["torch"].info["flops_per_step"]
  peaks = {side: workers[side].info["peak_flops"] for side in SIDES}
  result = summarize(rates, args.batch, flops, peaks)
  result.update(size=size, flops_per_step=flops, peaks=peaks,
                xla_flops_per_step=workers["jax"].info["xla_flops_per_step"],
                compile_s=workers["jax"].info["compile_s"],
                versions={s: workers[s].info["version"] for s in SIDES})
  return result


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    worker(args)
    return None
  print(f"TIRG ResNet-18 train step, batch {args.batch}, {args.threads} threads, "
        f"{args.rounds} alternated rounds x {args.steps} timed steps (+{args.warmup} warm-up), "
        f"cir_jax conv_impl={args.conv_impl}, {args.steps_per_call} step(s) per call; "
        f"load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
  results = [compare(args, int(s)) for s in args.sizes.split(",")]
  print("\n| image size | google/tirg ex/s min/med/max | cir_jax ex/s min/med/max | "
        "ratio (med) | per-round ratios | % of peak tirg / cir_jax | peak GFLOP/s torch / jax |")
  print("|---|---|---|---|---|---|---|")
  for r in results:
    t, j = r["torch"], r["jax"]
    print(f"| {r['size']} px | {t['min']:.2f} / {t['median']:.2f} / {t['max']:.2f} "
          f"| {j['min']:.2f} / {j['median']:.2f} / {j['max']:.2f} | {r['ratio']:.2f}x "
          f"| {', '.join(f'{x:.2f}' for x in r['round_ratios'])} "
          f"| {t['pct_peak']:.1f} / {j['pct_peak']:.1f} "
          f"| {r['peaks']['torch'] / 1e9:.0f} / {r['peaks']['jax'] / 1e9:.0f} |")
  for r in results:
    print(f"{r['size']} px: model GFLOP/step {r['flops_per_step'] / 1e9:.1f} (torch "
          f"FlopCounterMode), XLA's count {r['xla_flops_per_step'] / 1e9:.1f}; cir_jax compile "
          f"{r['compile_s']:.1f} s; torch {r['versions']['torch']}, jax {r['versions']['jax']}")
  print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
  return results


if __name__ == "__main__":
  main()
