"""2-D convolution with a choice of lowering: XLA's native conv or one im2col matmul.

XLA:CPU runs native convolutions (and especially their gradients) at a small
fraction of its matmul speed: on the 2-core dev machine a ResNet-18 forward at
64 px runs ~11 GFLOP/s native vs ~90 GFLOP/s for a plain matmul. Lowering each
convolution to shifted strided slices, one concatenation and one matmul keeps
the arithmetic on the fast path, and the transposes (for the backward pass) are
pads and adds. At 224 px the picture flips: the native lowering is faster
(ResNet-18 TIRG train step, batch 32: 3.46 vs 2.67 examples/s) and the im2col
buffers cost 2.4x the memory. On GPU/TPU the native convolution is the fast
one. So 'auto' picks the per-layer 'mixed' lowering (native 3x3 convs with
outputs of 4x4 and more and the 7x7 stem, matmul below: at 64 px 16% less CPU
per TIRG step than all-matmul, 2026-12-02, 6% less again with the native stem,
and 3% less with 4x4 maps native once training steps run native convolutions
in Eigen (cir_jax/xla_cpu.py), 2026-12-04)
only on CPU and only for images up to `AUTO_MATMUL_MAX_PIXELS`; above, all native
(at 224 px 'mixed' took 11.48 vs 11.01 CPU s per TIRG step, 2026-12-04;
docs/benchmarks.md has the measurements). Both lowerings have the same parameters
('kernel' [kh, kw, C_in, C_out], optional 'bias'), so checkpoints are shared.
"""
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

CONV_IMPLS = ("auto", "xla", "matmul", "mixed")
AUTO_MATMUL_MAX_PIXELS = 128 * 128   # CPU: matmul up to 128 px images, native above
# 'mixed': XLA's native convolution for the 7x7 stem and for 3x3 convolutions with
# outputs of at least this many pixels (per image), the matmul lowering for all others.
MIXED_NATIVE_MIN_OUT_PIXELS = 4 * 4


def layer_impl(conv_impl: str, input_hw: Sequence[int], kernel_size: Sequence[int],
               strides: Sequence[int], padding) -> str:
  """The lowering one convolution gets: 'mixed' decides per layer, others are returned as is.

  Measured on XLA:CPU (jax 0.10, fwd + bwd, batch 32; docs/benchmarks.md): the
  native 3x3 convolution beats the matmul lowering on maps of 8x8 and more
  (16x16x64: 30 vs 57 ms; 56x56x64: 0.77 vs 1.09 s) and, with the training
  step's Eigen convolutions (cir_jax/xla_cpu.py), on 4x4 outputs too (4x4x256:
  17.5 vs 20.1 ms, one core; the TIRG step at 64 px 464 -> 450 ms); it
  collapses on 2x2 outputs with many channels (2x2x512: 546 vs 14 ms; 4x4x256
  -> 2x2x512 stride 2: 135 vs 6.4 ms, the input gradient, before that gradient was
  computed by output phase: since, 8.9 vs 10.7 ms for the layer's backward, one core,
  2026-12-06, not yet re-tuned here); 1x1 projections are no slower as matmuls. The 7x7 stem is
  native: nothing differentiates the pixels, and without the input gradient
  XLA's conv runs the stem's forward + weight gradient 3x faster than im2col
  (64 px, batch 32: 18.7 vs 56.8 CPU ms; the TIRG step -6% CPU, 2026-12-04).
  """
  if conv_impl != "mixed":
    return conv_impl
  if tuple(kernel_size) == (7, 7):
    return "xla"
  (pt, pb), (pl, pr) = _explicit_padding(padding, kernel_size)
  h_out = (input_hw[0] + pt + pb - kernel_size[0]) // strides[0] + 1
  w_out = (input_hw[1] + pl + pr - kernel_size[1]) // strides[1] + 1
  native = tuple(kernel_size) == (3, 3) and h_out * w_out >= MIXED_NATIVE_MIN_OUT_PIXELS
  return "xla" if native else "matmul"


def resolve_conv_impl(conv_impl: str, image_pixels: Optional[int] = None) -> str:
  """'auto' -> 'mixed' (per layer, see `layer_impl`) on the CPU backend for images of <= AUTO_MATMUL_MAX_PIXELS
  (H * W of the network input; None = small), 'xla' otherwise."""
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"unknown conv_impl {conv_impl!r}; valid: {list(CONV_IMPLS)}")
  if conv_impl == "auto":
    small = image_pixels is None or image_pixels <= AUTO_MATMUL_MAX_PIXELS
    return "mixed" if jax.default_backend() == "cpu" and small else "xla"
  return conv_impl


def conv_as_matmul(x, kernel, strides: Sequence[int], padding):
  """Cross-correlation as im2col + matmul (same result as lax.conv_general_dilated, NHWC/HWIO).

  Args:
    x: [B, H, W, C_in].
    kernel: [kh, kw, C_in, C_out].
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)).

  Returns:
    [B, H_out, W_out, C_out].
  """
  kh, kw, c_in, c_out = kernel.shape
  sh, sw = strides
  x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  _, h, w, _ = x.shape
  h_out, w_out = (h - kh) // sh + 1, (w - kw) // sw + 1
  columns = [x[:, i:i + sh * (h_out - 1) + 1:sh, j:j + sw * (w_out - 1) + 1:sw, :]
             for i in range(kh) for j in range(kw)]
  patches = columns[0] if len(columns) == 1 else jnp.concatenate(columns, axis=-1)
  return jnp.einsum("bhwk,ko->bhwo", patches, kernel.reshape(kh * kw * c_in, c_out))


def _native_conv(x, kernel, strides, padding, **dilation):
  """lax.conv_general_dilated on NHWC inputs and HWIO kernels (`dilation`: lhs_ / rhs_dilation)."""
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, **dilation,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def native_conv_cpu(x, kernel, strides, padding):
  """XLA's native convolution (NHWC, HWIO) whose weight gradient reads x from memory.

  Same values and gradients as `jax.lax.conv_general_dilated`. Why: XLA:CPU
  computes the weight gradient as a convolution over x transposed to
  [C_in, H, W, B], and when x is an elementwise function of a stored tensor (a
  ReLU of BatchNorm, as in every ResNet) its fusion pass recomputes that function
  inside the transpose, which reads the stored tensor with a stride of H*W*C per
  element: 80-105 ms for one 56x56x64 map at batch 32 on one core, against ~9 ms
  for a plain transpose of x. Behind `_materialized` the transpose reads the x
  the forward pass already stored: the ResNet-18 TIRG train step, batch 32,
  2 cores, alternated, 2026-12-05: 224 px 5000 -> 4572 ms, 64 px 448 -> 429 ms
  (docs/benchmarks.md). Arguments and result as in `conv_as_matmul`. Being a
  custom VJP, it has no forward-mode derivative (`jax.jvp`); off CPU `Conv` uses
  the plain convolution.
  """
  return _native_conv(x, kernel, strides, padding)


def _native_conv_cpu_fwd(x, kernel, strides, padding):
  return _native_conv(x, kernel, strides, padding), (x, kernel)


def _native_conv_cpu_bwd(strides, padding, residuals, g):
  """Both gradients as convolutions in XLA:CPU's canonical NHWC / HWIO form.

  What XLA's autodiff would compute, written out: XLA canonicalises the
  transposed convolutions of autodiff (dims f01b_i01o, kernel 01oi) by adding
  transposes, but not inside while-loop bodies, where they then run ~150x slower
  (a train step under `lax.scan`, 2026-12-05); spelled out here, they are the same
  fast Eigen convolutions everywhere. A strided convolution's input gradient is
  computed by output phase (`_strided_input_grad`).
  """
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  (pt, _), (pl, _) = padding
  (h, w), (h_out, w_out) = x.shape[1:3], g.shape[1:3]
  if tuple(strides) == (1, 1):
    # dL/dx: g against the flipped kernel with C_in and C_out swapped.
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)      # [kh, kw, C_out, C_in]
    dx = _native_conv(g, flipped, (1, 1), ((kh - 1 - pt, h - h_out + pt),
                                           (kw - 1 - pl, w - w_out + pl)))
  else:
    dx = _strided_input_grad(g, kernel, (h, w), strides, (pt, pl))
  if (kh, kw) == (1, 1):
    # dL/dkernel of a 1x1 kernel: one matmul of the pixels it reads with g, contracting B, H, W.
    # (Eigen's convolution form below: 29.7 -> 5.2 ms for ResNet-18's 56x56x64 1x1/2 shortcut,
    # batch 32, 2 cores.) A negative padding after crops the rows no output reads. The pixels
    # come from the stored x (`_materialized`): fused, the copy in front of the dot recomputed
    # whole residual blocks' BatchNorm-ReLU-add chains (224 px: 46 -> 18 ms per 56x56 shortcut).
    def pixels_read(v):                                           # [B, H_out, W_out, C_in]
      v = jax.lax.pad(v, jnp.zeros((), v.dtype),
                      ((0, 0, 0), (pt, (h_out - 1) * strides[0] + 1 - h - pt, 0),
                       (pl, (w_out - 1) * strides[1] + 1 - w - pl, 0), (0, 0, 0)))
      return v[:, ::strides[0], ::strides[1]]
    read = _materialized(x, kernel.reshape(-1)[0], pixels_read)
    return dx, jnp.einsum("bhwc,bhwo->co", read, g)[None, None]
  # dL/dkernel: x as [C_in, H, W, B] against g as [H_out, W_out, B, C_out], dilated by the strides.
  x_t = _materialized(x, kernel.reshape(-1)[0], lambda v: jnp.transpose(v, (3, 1, 2, 0)))
  after_h = kh - h - pt + (h_out - 1) * strides[0]
  after_w = kw - w - pl + (w_out - 1) * strides[1]
  dk = _native_conv(x_t, jnp.transpose(g, (1, 2, 0, 3)),
                    (1, 1), ((pt, after_h), (pl, after_w)), rhs_dilation=strides)  # [C_in, kh, kw, C_out]
  return dx, jnp.transpose(dk, (1, 2, 0, 3))


native_conv_cpu.defvjp(_native_conv_cpu_fwd, _native_conv_cpu_bwd)


def _phase_taps(phase: int, stride: int, pad_before: int, kernel_len: int, phase_len: int,
                g_len: int):
  """(first tap, number of taps, g padding before, after) of one output phase, one axis.

  Input rows p = q * stride + phase receive g[o] * kernel[i] for o * stride + i - pad_before = p:
  the taps i = first, first + stride, ... and o = q + (phase + pad_before) // stride - m for the
  m-th of them, a stride-1 correlation of g with those taps reversed.
  """
  first = (phase + pad_before) % stride
  taps = len(range(first, kernel_len, stride))
  before = taps - 1 - (phase + pad_before) // stride
  return first, taps, before, phase_len + taps - 1 - g_len - before


def _strided_input_grad(g, kernel, x_hw, strides, pads_before):
  """dL/dx [B, H, W, C_in] of a strided convolution from g [B, H_out, W_out, C_out].

  The transposed convolution split by output phase: rows and columns of x with the
  same remainder modulo the strides see a fixed subset of the kernel's taps, so each
  of the s_h * s_w phases is a stride-1 convolution of g with those taps, and the
  phases interleave into x's grid. Same values as convolving g dilated by the strides
  (autodiff's form), without its multiplications by the inserted zeros: XLA:CPU's
  Eigen convolution pays for them (ResNet-18's 56x56x64 3x3/2 input gradient, batch
  32, 2 cores: 61.6 -> 23.8 ms, docs/benchmarks.md).
  """
  (h, w), (sh, sw), (pt, pl) = x_hw, strides, pads_before
  kh, kw, c_in, _ = kernel.shape
  qh, qw = -(-h // sh), -(-w // sw)       # rows / columns per phase (the last may overhang x)
  rows = []
  for a in range(sh):
    first_h, taps_h, before_h, after_h = _phase_taps(a, sh, pt, kh, qh, g.shape[1])
    cols = []
    for b in range(sw):
      first_w, taps_w, before_w, after_w = _phase_taps(b, sw, pl, kw, qw, g.shape[2])
      if not taps_h or not taps_w:        # no tap reaches this phase (a 1x1 / 2 shortcut)
        cols.append(jnp.zeros((g.shape[0], qh, qw, c_in), g.dtype))
        continue
      sub = jnp.flip(kernel[first_h::sh, first_w::sw], (0, 1)).transpose(0, 1, 3, 2)
      cols.append(_native_conv(_crop(g, before_h, after_h, before_w, after_w), sub, (1, 1),
                               ((max(before_h, 0), max(after_h, 0)),
                                (max(before_w, 0), max(after_w, 0)))))
    rows.append(jnp.stack(cols, axis=3))  # [B, qh, qw, sw, C_in]
  dx = jnp.stack(rows, axis=2)            # [B, qh, sh, qw, sw, C_in]
  return dx.reshape(g.shape[0], qh * sh, qw * sw, c_in)[:, :h, :w]


def _crop(g, before_h, after_h, before_w, after_w):
  """g [B, H, W, C] without the rows / columns a negative padding removes."""
  return g[:, max(-before_h, 0):g.shape[1] - max(-after_h, 0),
           max(-before_w, 0):g.shape[2] - max(-after_w, 0)]


def _materialized(x, probe, fn):
  """fn(x) computed from the stored x: XLA cannot fuse x's producers into it.

  XLA:CPU drops optimization barriers before fusion, but not a conditional whose
  predicate it cannot evaluate at compile time and whose branches differ. The
  predicate `probe == probe` (probe: one kernel entry, replicated on every device,
  so no communication) is false only for a NaN probe; that branch returns
  fn(x * NaN), which a NaN weight gives the gradients anyway. `fn` (a transpose,
  a strided read) runs inside the branch, so x is read once, not copied first.
  """
  return jax.lax.cond(probe == probe, fn, lambda v: fn(v * probe), x)


def convolve(x, kernel, strides: Sequence[int], padding, impl: str):
  """y [B, H_out, W_out, C_out] = x [B, H, W, C_in] * kernel [kh, kw, C_in, C_out] with one
  layer's lowering (`layer_impl`): the im2col matmul, `native_conv_cpu` on CPU, else XLA's
  convolution. `padding`: ((top, bottom), (left, right))."""
  if impl == "matmul":
    return conv_as_matmul(x, kernel, strides, padding)
  if jax.default_backend() == "cpu":
    return native_conv_cpu(x, kernel, tuple(strides), padding)
  return _native_conv(x, kernel, tuple(strides), padding)


def _explicit_padding(padding, kernel_size):
  if padding == "SAME":
    return tuple(((k - 1) // 2, k // 2) for k in kernel_size)
  if padding == "VALID":
    return ((0, 0), (0, 0))
  return tuple(tuple(p) for p in padding)


class Conv(nn.Module):
  """Drop-in for `nn.Conv` (NHWC, stride-only, explicit or SAME/VALID padding).

  Note 'SAME' here pads (k-1)//2 before and k//2 after, which equals XLA's SAME
  for stride 1 (the only way this module is used with 'SAME').
  """
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Any = "SAME"
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    impl = layer_impl(resolve_conv_impl(self.conv_impl), x.shape[1:3], self.kernel_size,
                      self.strides, self.padding)
    padding = _explicit_padding(self.padding, self.kernel_size)
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        tuple(self.kernel_size) + (x.shape[-1], self.features), self.param_dtype)
    y = convolve(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, padding, impl)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,),
                         self.param_dtype).astype(self.dtype)
    return y


def max_pool(x, window: Sequence[int], strides: Sequence[int], padding, conv_impl: str = "xla"):
  """`nn.max_pool` (-inf padding, NHWC) with a cheap gradient on CPU.

  XLA:CPU lowers the gradient of `nn.max_pool` (select-and-scatter) to a
  scatter with four full-size iota index tensors: ~10% of the ResNet-18 TIRG
  train step at 64 px and ~13% at 224 px in profiles (docs/benchmarks.md). On
  the CPU backend, and wherever the matmul lowerings are asked for, the pool is
  a maximum over the window's strided slices and its gradient goes, as
  select-and-scatter's does, to the first maximum of each window in row-major
  order, via pads and adds. Same values and gradients.

  Args:
    x: [B, H, W, C].
    window: (wh, ww).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)).
    conv_impl: 'matmul' or 'mixed' for the slice lowering on any backend; with
      'xla' (GPU/TPU, or CPU at large images) only the CPU backend uses it.
  """
  if conv_impl not in ("matmul", "mixed") and jax.default_backend() != "cpu":
    return nn.max_pool(x, tuple(window), strides=tuple(strides), padding=padding)
  return _max_pool(x, tuple(window), tuple(strides), tuple(tuple(p) for p in padding))


def _pool_slices(x, window, strides, padding):
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)), constant_values=-jnp.inf)
  (wh, ww), (sh, sw) = window, strides
  h_out, w_out = (xp.shape[1] - wh) // sh + 1, (xp.shape[2] - ww) // sw + 1
  offsets = [(i, j) for i in range(wh) for j in range(ww)]
  slices = [xp[:, i:i + sh * (h_out - 1) + 1:sh, j:j + sw * (w_out - 1) + 1:sw, :]
            for i, j in offsets]
  return xp.shape, offsets, slices


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
  _, _, slices = _pool_slices(x, window, strides, padding)
  return functools.reduce(jnp.maximum, slices)


def _max_pool_fwd(x, window, strides, padding):
  y = _max_pool(x, window, strides, padding)
  return y, (x, y)


def _max_pool_bwd(window, strides, padding, residuals, g):
  x, y = residuals
  padded_shape, offsets, slices = _pool_slices(x, window, strides, padding)
  sh, sw = strides
  taken = jnp.zeros(y.shape, bool)
  dxp = jnp.zeros(padded_shape, g.dtype)
  for (i, j), s in zip(offsets, slices):
    hit = (s == y) & ~taken
    taken = taken | hit
    contrib = jnp.where(hit, g, 0)
    h_hi = padded_shape[1] - i - (sh * (y.shape[1] - 1) + 1)
    w_hi = padded_shape[2] - j - (sw * (y.shape[2] - 1) + 1)
    dxp = dxp + jax.lax.pad(contrib, jnp.zeros((), g.dtype),
                            ((0, 0, 0), (i, h_hi, sh - 1), (j, w_hi, sw - 1), (0, 0, 0)))
  (top, _), (left, _) = padding
  return (dxp[:, top:top + x.shape[1], left:left + x.shape[2], :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
