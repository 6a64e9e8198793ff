"""BatchNorm over the last axis without a stored centred copy of x.

`nn.BatchNorm` computes y = (x - mean) * (scale / sqrt(var + eps)) + bias; under
autodiff the centred x is a residual of the backward pass, so XLA writes it out
as one more full-size tensor per layer and reads it back. Here the forward pass
is y = x * a + c with per-channel a = scale / sqrt(var + eps), c = bias - mean * a
(one multiply-add per element, as torch's CPU kernel), and the gradient is
written out (`normalize_batch`) with the centred sums torch uses, x - mean being
recomputed inside the fusions that read it: x itself (the convolution's output,
stored anyway) is the only full-size input of both passes. Same variables,
statistics (E[x^2] - E[x]^2 in float32, clipped at 0), running averages and dtype
rules as `nn.BatchNorm`, so checkpoints are shared; values and gradients agree to
float32 rounding (tests/test_batch_norm.py).
"""
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
  """Drop-in for `nn.BatchNorm(axis=-1)` without axis_name, mask or use_bias/use_scale=False.

  x: [..., C] -> [..., C]. Training (use_running_average=False) normalises with the
  batch statistics over all axes but the last (under jit with a sharded batch,
  XLA makes them global) and updates `batch_stats/mean`, `batch_stats/var` as
  ra = momentum * ra + (1 - momentum) * batch statistic.
  """
  use_running_average: Optional[bool] = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None):
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    if use_running_average:
      a = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
      return (x * a + (bias - ra_mean.value * a)).astype(dtype)
    y, mean, var = normalize_batch(x.astype(jnp.promote_types(x.dtype, jnp.float32)), scale,
                                   bias, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_batch(x, scale, bias, epsilon):
  """Training-mode BatchNorm: (y [..., C], mean [C], biased var [C]) of x [..., C].

  mean and var over all axes but the last, var = E[x^2] - mean^2 clipped at 0 (as
  nn.BatchNorm); y = x * a + c with a = scale / sqrt(var + eps), c = bias - mean * a.
  """
  return _normalize_batch_fwd(x, scale, bias, epsilon)[0]


def _normalize_batch_fwd(x, scale, bias, epsilon):
  axes = tuple(range(x.ndim - 1))
  mean = x.mean(axes)
  var = jnp.maximum(0.0, (x * x).mean(axes) - mean * mean)
  inv = jax.lax.rsqrt(var + epsilon)
  a = scale * inv
  return (x * a + (bias - mean * a), mean, var), (x, mean, inv, scale)


def _normalize_batch_bwd(epsilon, residuals, cotangents):
  """The BatchNorm gradient with centred sums, as torch's CPU kernel computes it.

  With S1 = sum g and S2 = sum g * (x - mean) over the N positions of a channel
  (x - mean recomputed inside the sum, never stored):
    dL/dbias = S1, dL/dscale = S2 * inv,
    dL/dx = a * g - a * S1 / N - (x - mean) * a * inv^2 * S2 / N
            + (dL/dmean + 2 (x - mean) dL/dvar) / N      (the statistics' own cotangents).
  """
  del epsilon
  x, mean, inv, scale = residuals
  g, g_mean, g_var = cotangents
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  s1 = g.sum(axes)
  s2 = (g * (x - mean)).sum(axes)
  a = scale * inv
  k1 = (2 * g_var - a * inv * inv * s2) / n
  # (x - mean) * k1 as x * k1 - mean * k1: with x - mean in dL/dx too, XLA would store it.
  dx = a * g + x * k1 + ((g_mean - a * s1) / n - mean * k1)
  return dx.astype(x.dtype), (s2 * inv).astype(scale.dtype), s1.astype(scale.dtype)


normalize_batch.defvjp(_normalize_batch_fwd, _normalize_batch_bwd)
