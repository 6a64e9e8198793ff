"""fused_lstm: the hoisted LSTM equals flax's nn.RNN(OptimizedLSTMCell) and a NumPy LSTM."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cir_jax.models import fused_lstm
from cir_jax.models import text_lstm


class _RNNTextEncoder(nn.Module):
  """The encoder as it was before fused_lstm: nn.RNN over nn.OptimizedLSTMCell."""
  vocab_size: int
  word_dim: int = 8
  hidden_dim: int = 6
  out_dim: int = 5

  @nn.compact
  def __call__(self, ids, mask, train=False):
    mask = mask.astype(bool)
    words = nn.Embed(self.vocab_size, self.word_dim, name="embed")(ids)
    lengths = jnp.maximum(mask.sum(axis=1), 1)
    outputs = nn.RNN(nn.OptimizedLSTMCell(self.hidden_dim), name="lstm")(words, seq_lengths=lengths)
    last = jnp.take_along_axis(outputs, (lengths - 1)[:, None, None], axis=1)[:, 0]
    pooled = nn.Dense(self.out_dim, name="out")(nn.Dropout(0.1, deterministic=not train)(last))
    return {"pooled": pooled, "tokens": outputs}


def _batch():
  ids = jnp.array([[3, 4, 5, 6, 0], [7, 8, 0, 0, 0], [9, 10, 11, 12, 13]], jnp.int32)
  return ids, ids > 0


def test_same_parameters_outputs_and_gradients_as_flax_rnn():
  ids, mask = _batch()
  new = text_lstm.LSTMTextEncoder(vocab_size=20, word_dim=8, hidden_dim=6, out_dim=5)
  old = _RNNTextEncoder(vocab_size=20)
  params = new.init(jax.random.PRNGKey(0), ids, mask)
  old_params = old.init(jax.random.PRNGKey(0), ids, mask)
  # Same tree and the same initial values (same names, initialisers and rngs).
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(old_params)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(old_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Perturb the biases so every gate term is exercised away from zero.
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.3 if "bias" in jax.tree_util.keystr(p) else v, params)
  out_new, out_old = new.apply(params, ids, mask), old.apply(params, ids, mask)
  for key in ("pooled", "tokens"):
    np.testing.assert_allclose(out_new[key], out_old[key], rtol=1e-5, atol=1e-6)
  weights = jax.random.normal(jax.random.PRNGKey(1), out_new["tokens"].shape)

  def loss(module, p):
    out = module.apply(p, ids, mask)
    return jnp.sum(out["pooled"] ** 2) + jnp.sum(out["tokens"] * weights)

  g_new, g_old = jax.grad(lambda p: loss(new, p))(params), jax.grad(lambda p: loss(old, p))(params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_new), jax.tree_util.tree_leaves(g_old)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    assert np.abs(np.asarray(a)).max() > 0, jax.tree_util.keystr(path)


def _numpy_lstm(x, w_i, w_h, b):
  sig = lambda v: 1 / (1 + np.exp(-v))
  bsz, steps, _ = x.shape
  hidden = w_h.shape[0]
  h, c, out = np.zeros((bsz, hidden)), np.zeros((bsz, hidden)), []
  for t in range(steps):
    z = x[:, t] @ w_i + h @ w_h + b
    i, f, g, o = sig(z[:, :hidden]), sig(z[:, hidden:2 * hidden]), np.tanh(z[:, 2 * hidden:3 * hidden]), sig(z[:, 3 * hidden:])
    c = f * c + i * g
    h = o * np.tanh(c)
    out.append(h)
  return np.stack(out, 1)


def test_lstm_sequence_equals_numpy_and_its_vjp_equals_autodiff_of_the_scan():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 4, 5)).astype(np.float32)
  w_i = (0.5 * rng.standard_normal((5, 12))).astype(np.float32)
  w_h = (0.5 * rng.standard_normal((3, 12))).astype(np.float32)
  b = (0.5 * rng.standard_normal(12)).astype(np.float32)
  np.testing.assert_allclose(fused_lstm.lstm_sequence(x, w_i, w_h, b),
                             _numpy_lstm(x.astype(np.float64), w_i, w_h, b), rtol=1e-5, atol=1e-6)
  cotangent = rng.standard_normal((3, 4, 3)).astype(np.float32)
  custom = jax.vjp(fused_lstm.lstm_sequence, x, w_i, w_h, b)[1](cotangent)
  autodiff = jax.vjp(lambda *a: fused_lstm._forward(*a)[0], x, w_i, w_h, b)[1](cotangent)
  for name, a, e in zip(("dx", "dw_i", "dw_h", "db"), custom, autodiff):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6, err_msg=name)
