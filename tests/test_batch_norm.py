"""cir_jax.models.batch_norm.BatchNorm: nn.BatchNorm's values, gradients, statistics and variables."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cir_jax.models import batch_norm


def _numpy_train(x, scale, bias, eps):
  """Batch-statistics BatchNorm in float64 NumPy: (y, mean, biased var)."""
  x = np.asarray(x, np.float64)
  mean = x.reshape(-1, x.shape[-1]).mean(0)
  var = x.reshape(-1, x.shape[-1]).var(0)
  return (x - mean) / np.sqrt(var + eps) * scale + bias, mean, var


def _inputs(shape=(4, 5, 6, 8), offset=3.0):
  kx, ks, kb = jax.random.split(jax.random.PRNGKey(0), 3)
  x = offset + 2.0 * jax.random.normal(kx, shape)   # a mean far from 0, as after a conv
  scale = 1.0 + 0.5 * jax.random.normal(ks, shape[-1:])
  bias = 0.3 * jax.random.normal(kb, shape[-1:])
  return x, scale, bias


@pytest.mark.parametrize("shape", [(4, 5, 6, 8), (16, 12)])
def test_training_matches_numpy_and_updates_running_averages(shape):
  x, scale, bias = _inputs(shape)
  bn = batch_norm.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  variables = bn.init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, variables) == {
      "params": {"scale": (shape[-1],), "bias": (shape[-1],)},
      "batch_stats": {"mean": (shape[-1],), "var": (shape[-1],)}}
  params = {"scale": scale, "bias": bias}
  y, updates = bn.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                        mutable=["batch_stats"])
  want, mean, var = _numpy_train(x, scale, bias, 1e-5)
  np.testing.assert_allclose(y, want, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5)


def test_values_gradients_and_statistics_equal_flax_batch_norm():
  x, scale, bias = _inputs()
  ours = batch_norm.BatchNorm(momentum=0.9, epsilon=1e-5)
  flax_bn = nn.BatchNorm(momentum=0.9, epsilon=1e-5)
  stats = {"mean": jnp.linspace(-1, 1, 8), "var": jnp.linspace(0.5, 2, 8)}
  g = jax.random.normal(jax.random.PRNGKey(2), x.shape)

  def loss(module, train):
    def f(x, params):
      y, updates = module.apply({"params": params, "batch_stats": stats}, x,
                                use_running_average=not train, mutable=["batch_stats"])
      return jnp.sum(y * g), (y, updates)
    return jax.grad(f, argnums=(0, 1), has_aux=True)(x, {"scale": scale, "bias": bias})

  for train in (True, False):
    (dx, dparams), (y, updates) = loss(ours, train)
    (dx_f, dparams_f), (y_f, updates_f) = loss(flax_bn, train)
    np.testing.assert_allclose(y, y_f, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(dx, dx_f, atol=2e-5, rtol=1e-4)
    for name in ("scale", "bias"):
      np.testing.assert_allclose(dparams[name], dparams_f[name], atol=1e-4, rtol=1e-5)
    for name in ("mean", "var"):
      np.testing.assert_allclose(updates["batch_stats"][name], updates_f["batch_stats"][name],
                                 rtol=1e-6)


def test_input_gradient_matches_the_hand_derived_formula():
  """dL/dx = a * (g - mean(g) - x_hat * mean(g * x_hat)) with a = scale / sqrt(var + eps)."""
  x, scale, bias = _inputs((32, 8))
  g = np.asarray(jax.random.normal(jax.random.PRNGKey(3), x.shape), np.float64)
  bn = batch_norm.BatchNorm(use_running_average=False, epsilon=1e-5)
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": {"mean": jnp.zeros(8), "var": jnp.ones(8)}}
  dx = jax.grad(lambda x: jnp.sum(bn.apply(variables, x, mutable=["batch_stats"])[0] * g))(x)
  xs = np.asarray(x, np.float64)
  var = xs.var(0)
  x_hat = (xs - xs.mean(0)) / np.sqrt(var + 1e-5)
  want = np.asarray(scale) / np.sqrt(var + 1e-5) * (g - g.mean(0) - x_hat * (g * x_hat).mean(0))
  np.testing.assert_allclose(dx, want, atol=1e-5, rtol=1e-4)


def test_dtype_follows_flax():
  x, _, _ = _inputs()
  for dtype, x_dtype, want in ((None, jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32,
                               jnp.bfloat16), (None, jnp.bfloat16, jnp.float32)):
    ours = batch_norm.BatchNorm(use_running_average=False, dtype=dtype)
    theirs = nn.BatchNorm(use_running_average=False, dtype=dtype)
    xi = x.astype(x_dtype)
    y = ours.apply(ours.init(jax.random.PRNGKey(0), xi), xi, mutable=["batch_stats"])[0]
    y_f = theirs.apply(theirs.init(jax.random.PRNGKey(0), xi), xi, mutable=["batch_stats"])[0]
    assert y.dtype == y_f.dtype == want


def test_normalize_batch_gradient_includes_the_statistics_cotangents():
  """All three outputs used: the custom gradient equals autodiff of the plain formulas."""
  x, scale, bias = _inputs((6, 5, 8))
  g = jax.random.normal(jax.random.PRNGKey(4), x.shape)

  def plain(x, scale, bias):
    mean = x.mean((0, 1))
    var = jnp.maximum(0.0, (x * x).mean((0, 1)) - mean * mean)
    return (x - mean) * (scale * jax.lax.rsqrt(var + 1e-5)) + bias, mean, var

  def loss(fn):
    def f(x, scale, bias):
      y, mean, var = fn(x, scale, bias)
      return jnp.sum(y * g) + jnp.sum(jnp.sin(mean)) + 3.0 * jnp.sum(var)
    return jax.grad(f, argnums=(0, 1, 2))(x, scale, bias)

  ours = loss(lambda x, s, b: batch_norm.normalize_batch(x, s, b, 1e-5))
  for got, want in zip(ours, loss(plain)):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)
