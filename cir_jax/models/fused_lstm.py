"""One LSTM layer over a whole sequence, with its input projection and weight gradients hoisted.

Same arithmetic as `flax.linen.OptimizedLSTMCell` scanned by `nn.RNN` (gates
i, f, g, o; c' = f * c + i * g, h' = o * tanh(c'); zero initial state), and the
same parameters (`OptimizedLSTMCell_0/{ii,if,ig,io}/kernel`,
`.../{hi,hf,hg,ho}/{kernel,bias}`, same initialisers), so checkpoints and
initial values are shared with the `nn.RNN` version.

What differs is the schedule. Autodiff of a scanned cell multiplies the input
by W_i inside the loop and accumulates dW_i, dW_h with one K = batch matmul
per time step. Here the forward multiplies all T steps by W_i in one matmul
before the recurrence, and a custom VJP runs only dh_{t-1} = dgates_t W_h^T
inside the backward loop; dW_i, dW_h, the bias and the input gradient are
one matmul each over all T * B rows afterwards (as cuDNN / oneDNN RNN kernels
do). The TIRG LSTM (batch 32, 8 words, 512 wide), forward + backward on one
CPU core: 41 vs 50 ms (docs/benchmarks.md).
"""
from typing import Tuple

import flax.linen as nn
from flax.linen.recurrent import DenseParams
import jax
import jax.numpy as jnp

GATES = ("i", "f", "g", "o")


def _cell(xg_t, h, c, w_h):
  """One step. xg_t: [B, 4H] input projection + bias; h, c: [B, H]; w_h: [H, 4H]."""
  i, f, g, o = jnp.split(xg_t + h @ w_h, 4, axis=-1)
  i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
  c = f * c + i * g
  return o * jnp.tanh(c), c, (i, f, g, o)


def _forward(x, w_i, w_h, b):
  xg = jnp.einsum("btd,dg->tbg", x, w_i) + b           # [T, B, 4H], one matmul for all steps

  def step(carry, xg_t):
    h, c = carry
    h_new, c_new, gates = _cell(xg_t, h, c, w_h)
    return (h_new, c_new), (h_new, c_new, h, c, gates)

  zeros = jnp.zeros((x.shape[0], w_h.shape[0]), x.dtype)
  _, (hs, cs, h_prev, c_prev, gates) = jax.lax.scan(step, (zeros, zeros), xg)
  return jnp.swapaxes(hs, 0, 1), (x, w_i, w_h, h_prev, c_prev, cs, gates)


@jax.custom_vjp
def lstm_sequence(x, w_i, w_h, b):
  """LSTM over a sequence from a zero state.

  Args:
    x: [B, T, D] inputs.
    w_i: [D, 4H] input kernels of gates i, f, g, o side by side.
    w_h: [H, 4H] recurrent kernels, same order.
    b: [4H] bias.

  Returns:
    [B, T, H] hidden state after every step.
  """
  return _forward(x, w_i, w_h, b)[0]


def _backward(residuals, d_hs):
  x, w_i, w_h, h_prev, c_prev, cs, (i, f, g, o) = residuals

  def step(carry, inputs):
    dh, dc = carry
    dh_out, c, c_before, i_t, f_t, g_t, o_t = inputs
    dh = dh + dh_out
    tanh_c = jnp.tanh(c)
    dc = dc + dh * o_t * (1 - tanh_c * tanh_c)
    d_gates = jnp.concatenate([dc * g_t * i_t * (1 - i_t), dc * c_before * f_t * (1 - f_t),
                               dc * i_t * (1 - g_t * g_t), dh * tanh_c * o_t * (1 - o_t)], axis=-1)
    return (d_gates @ w_h.T, dc * f_t), d_gates

  zeros = jnp.zeros_like(h_prev[0])
  _, d_gates = jax.lax.scan(step, (zeros, zeros),
                            (jnp.swapaxes(d_hs, 0, 1), cs, c_prev, i, f, g, o), reverse=True)
  return (jnp.einsum("tbg,dg->btd", d_gates, w_i),          # dx
          jnp.einsum("btd,tbg->dg", x, d_gates),            # dW_i
          jnp.einsum("tbj,tbg->jg", h_prev, d_gates),       # dW_h
          d_gates.sum(axis=(0, 1)))                          # db


lstm_sequence.defvjp(lambda x, w_i, w_h, b: _forward(x, w_i, w_h, b), _backward)


class LSTMCellParams(nn.Module):
  """The parameters of `nn.OptimizedLSTMCell` (its `DenseParams`, names and initialisers),
  returned concatenated: (w_i [D, 4H], w_h [H, 4H], b [4H]) for `lstm_sequence`.

  Name the instance "OptimizedLSTMCell_0" where an `nn.RNN(nn.OptimizedLSTMCell(H))`
  stood, and the parameter tree (and its initial values) stays the same.
  """
  hidden_dim: int

  @nn.compact
  def __call__(self, x) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """x: [..., D] inputs (only D is read)."""
    h = self.hidden_dim
    cell = nn.OptimizedLSTMCell(h, parent=None)   # unbound: only its initialisers are read
    hidden = jnp.zeros((1, h), jnp.float32)       # shape only, like the cell's carry
    w_i, w_h, b = [], [], []
    for gate in GATES:
      w_i.append(DenseParams(h, use_bias=False, kernel_init=cell.kernel_init,
                             bias_init=cell.bias_init, name=f"i{gate}")(x)[0])
      kernel, bias = DenseParams(h, use_bias=True, kernel_init=cell.recurrent_kernel_init,
                                 bias_init=cell.bias_init, name=f"h{gate}")(hidden)
      w_h.append(kernel)
      b.append(bias)
    return jnp.concatenate(w_i, -1), jnp.concatenate(w_h, -1), jnp.concatenate(b, -1)
