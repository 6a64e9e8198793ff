"""BatchNorm over the last axis, normalising as y = x * a + c (one multiply-add per element).

`nn.BatchNorm` computes y = (x - mean) * (scale / sqrt(var + eps)) + bias; under
autodiff the centred x is a residual of the backward pass, so XLA writes it out
as one more full-size tensor per layer (and reads it back). Folding the
statistics into a per-channel a = scale / sqrt(var + eps) and c = bias - mean * a
first, as torch's CPU kernel does, leaves x itself (the convolution's output,
stored anyway) as the only full-size input of both passes: the gradient
sums g and g * x, and every elementwise function of them fuses into its
consumer. Same variables, statistics (E[x^2] - E[x]^2 in float32, clipped at 0),
running averages and dtype rules as `nn.BatchNorm`, so checkpoints are shared;
values agree to float32 rounding (tests/test_batch_norm.py).
"""
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
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
      mean = x32.mean(axes)
      var = jnp.maximum(0.0, (x32 * x32).mean(axes) - mean * mean)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    a = scale * jax.lax.rsqrt(var + self.epsilon)
    c = bias - mean * a
    dtype = self.dtype or jnp.result_type(x, scale, bias)
    return (x * a + c).astype(dtype)
