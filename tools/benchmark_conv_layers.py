"""ResNet-18's convolutions one by one: PyTorch (oneDNN) vs cir_jax (XLA:CPU), alternated.

  python tools/benchmark_conv_layers.py --size 224 --threads 1

Where `tools/benchmark_vs_pytorch.py` says how far apart the two train steps
are, this says which convolutions make the difference. For every distinct
convolution of the TIRG ResNet-18 at `--size` px (the stem, the first and the
repeated 3x3 of each stage, the 1x1 / 2 shortcuts) it times, on the same
`--threads` CPUs in one process, alternating the frameworks each round:

  fwd    y = conv(x, w)
  bwd    dx and dw from dy (dw only for the stem: nothing differentiates pixels),
         PyTorch's `autograd.grad` re-run on a kept graph vs `jax.vjp` of the
         lowering cir_jax's model uses for this layer (`conv.layer_impl` of
         `--conv_impl`, 'auto' by default; `conv.convolve`, so on CPU the
         native convolutions' gradients are `conv.native_conv_cpu`'s)
  dgrad, wgrad   the two halves of bwd, cir_jax only

compiled as cir_jax's train step compiles (`--xla_options train`: convolutions
in Eigen, cir_jax/xla_cpu.py) or with XLA's defaults (`default`: YNNPACK),
and prints ms (minimum over `--rounds` x `--steps`) and GFLOP/s (useful conv
FLOPs, 2 * MACs; bwd counts two convolutions' worth, one for the stem).
Batch `--batch`, NHWC for JAX, NCHW for PyTorch as their models use them.

Timing only here, never in tests (tests/test_benchmarks.py runs it at a tiny
size).
"""
import argparse
import os
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def resnet18_convs(size: int):
  """[(name, c_in, c_out, kernel, stride, input px)] for ResNet-18 at size x size."""
  stem_out = (size + 1) // 2
  stage_in = (stem_out + 1) // 2          # after the 3x3 stride-2 max-pool
  layers = [("stem 7x7/2", 3, 64, 7, 2, size)]
  channels, hw = 64, stage_in
  for stage, width in enumerate((64, 128, 256, 512)):
    if stage > 0:
      layers.append((f"stage{stage} 3x3/2", channels, width, 3, 2, hw))
      layers.append((f"stage{stage} 1x1/2", channels, width, 1, 2, hw))   # the shortcut
      hw = (hw + 1) // 2
    layers.append((f"stage{stage} 3x3", width, width, 3, 1, hw))
    channels = width
  return layers


def conv_flops(batch, c_in, c_out, kernel, stride, hw):
  out = (hw + 2 * (kernel // 2) - kernel) // stride + 1
  return 2 * batch * out * out * kernel * kernel * c_in * c_out


def _jax_layer(conv_lib, jax, jnp, c_in, c_out, kernel, stride, hw, batch, conv_impl, image_px,
               options):
  pad = kernel // 2
  padding = ((pad, pad), (pad, pad))
  # 'auto' is decided by the network's input size, as cir_jax/models/build.py does.
  impl = conv_lib.layer_impl(conv_lib.resolve_conv_impl(conv_impl, image_px), (hw, hw),
                             (kernel, kernel), (stride, stride), padding)

  def conv(x, w):   # what the model's Conv runs for this layer, gradients included
    return conv_lib.convolve(x, w, (stride, stride), padding, impl)

  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (batch, hw, hw, c_in), jnp.float32)
  w = 0.05 * jax.random.normal(key, (kernel, kernel, c_in, c_out), jnp.float32)
  y = jax.eval_shape(conv, x, w)
  dy = jnp.ones(y.shape, y.dtype)
  jit = lambda f: jax.jit(f, compiler_options=options)
  wgrad = jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy))
  fns = {"fwd": (jit(conv), (x, w)), "wgrad": (wgrad, (x, w, dy))}
  if c_in == 3:   # the stem: nothing differentiates the pixels, its backward is its wgrad
    fns["bwd"] = fns["wgrad"]
  else:
    fns["bwd"] = (jit(lambda x, w, dy: jax.vjp(conv, x, w)[1](dy)), (x, w, dy))
    fns["dgrad"] = (jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)), (x, w, dy))
  runners = {}
  for name, (fn, args) in fns.items():
    jax.block_until_ready(fn(*args))
    runners[name] = (lambda fn=fn, args=args: jax.block_until_ready(fn(*args)))
  return impl, runners


def _torch_layer(torch, c_in, c_out, kernel, stride, hw, batch):
  x = torch.randn(batch, c_in, hw, hw, requires_grad=c_in != 3)
  w = (0.05 * torch.randn(c_out, c_in, kernel, kernel)).requires_grad_()
  conv = torch.nn.functional.conv2d

  def fwd():
    with torch.no_grad():
      conv(x, w, stride=stride, padding=kernel // 2)

  y = conv(x, w, stride=stride, padding=kernel // 2)
  dy = torch.ones_like(y)
  wrt = [x, w] if x.requires_grad else [w]

  def bwd():  # the backward alone: the graph of y is kept and re-run
    torch.autograd.grad(y, wrt, dy, retain_graph=True)

  fwd()
  bwd()
  return {"fwd": fwd, "bwd": bwd}


def _best_ms(fn, steps):
  best = float("inf")
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return 1e3 * best


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=224, help="image size of the ResNet-18")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--threads", type=int, default=1, help="CPUs for both frameworks")
  parser.add_argument("--rounds", type=int, default=3, help="alternations per layer")
  parser.add_argument("--steps", type=int, default=3, help="timed calls per op per round")
  parser.add_argument("--conv_impl", default="auto", help="cir_jax lowering (conv.CONV_IMPLS)")
  parser.add_argument("--layers", default="", help="comma-separated layer names (default: all)")
  parser.add_argument("--xla_options", default="train", choices=("train", "default"),
                      help="compile as the train step does (cir_jax/xla_cpu.py) or with XLA's "
                           "defaults")
  args = parser.parse_args(argv)

  before = os.sched_getaffinity(0)
  cpus = sorted(before)[:args.threads]
  os.sched_setaffinity(0, cpus)
  try:
    return _run(args, cpus)
  finally:
    os.sched_setaffinity(0, before)


def _run(args, cpus):
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from cir_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  from cir_jax.models import conv as conv_lib  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)
  options = xla_cpu.train_compiler_options() if args.xla_options == "train" else {}

  wanted = [n.strip() for n in args.layers.split(",") if n.strip()]
  layers = [l for l in resnet18_convs(args.size) if not wanted or l[0] in wanted]
  print(f"ResNet-18 convolutions at {args.size} px, batch {args.batch}, {args.threads} thread(s) "
        f"(CPUs {cpus}), torch {torch.__version__}, jax {jax.__version__}, "
        f"{args.rounds} alternated rounds x {args.steps} calls, min ms, XLA options "
        f"{options or 'default'}")
  print("| layer | input | cir_jax lowering | GFLOP fwd | fwd torch / jax ms | bwd torch / jax ms "
        "| jax dgrad / wgrad ms | fwd GFLOP/s torch / jax | bwd GFLOP/s torch / jax |")
  print("|---|---|---|---|---|---|---|---|---|")
  rows = []
  for name, c_in, c_out, kernel, stride, hw in layers:
    impl, jax_runs = _jax_layer(conv_lib, jax, jnp, c_in, c_out, kernel, stride, hw, args.batch,
                                args.conv_impl, args.size * args.size, options)
    torch_runs = _torch_layer(torch, c_in, c_out, kernel, stride, hw, args.batch)
    best = {}
    for r in range(args.rounds):
      order = (("torch", torch_runs), ("jax", jax_runs))
      for side, runs in (order if r % 2 == 0 else order[::-1]):
        for op, fn in runs.items():
          key = (side, op)
          best[key] = min(best.get(key, float("inf")), _best_ms(fn, args.steps))
    flops = conv_flops(args.batch, c_in, c_out, kernel, stride, hw)
    bwd_flops = flops if c_in == 3 else 2 * flops
    t_fwd, j_fwd = best["torch", "fwd"], best["jax", "fwd"]
    t_bwd, j_bwd = best["torch", "bwd"], best["jax", "bwd"]
    dgrad = f"{best['jax', 'dgrad']:.2f}" if ("jax", "dgrad") in best else "-"
    row = {"layer": name, "torch_fwd": t_fwd, "jax_fwd": j_fwd, "torch_bwd": t_bwd, "jax_bwd": j_bwd}
    rows.append(row)
    print(f"| {name} | {hw}x{hw}x{c_in} | {impl} | {flops / 1e9:.2f} | {t_fwd:.2f} / {j_fwd:.2f} "
          f"| {t_bwd:.2f} / {j_bwd:.2f} | {dgrad} / {best['jax', 'wgrad']:.2f} "
          f"| {flops / t_fwd / 1e6:.0f} / {flops / j_fwd / 1e6:.0f} "
          f"| {bwd_flops / t_bwd / 1e6:.0f} / {bwd_flops / j_bwd / 1e6:.0f} |", flush=True)
  return rows


if __name__ == "__main__":
  main()
