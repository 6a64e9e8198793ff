"""Attribute as Operator: the text as a d x d matrix acting on the image feature.

TIRG paper, section 3.1: "Attribute as Operator [33] embeds each text as a
transformation matrix, T_t, and applies T_t to phi_x to create phi_xt."
Original method: Nagarajan and Grauman, "Attributes as Operators: Factorizing
Unseen Attribute-Object Compositions", ECCV 2018, where each attribute owns a
matrix initialised to the identity. Here the matrix is predicted from the text
feature (the texts are free-form, not a fixed attribute list):
T_t = I + reshape(fc(phi_t)), the fc initialised small so T_t starts near I.

A full d x d prediction has d_t * d^2 weights (134M at d = 512); `rank` > 0
predicts a low-rank update T_t = I + U_t V_t^T (U_t, V_t [d, rank]) instead.
"""
import flax.linen as nn
import jax.numpy as jnp


class AttributeOperator(nn.Module):
  """phi_xt = T_t phi_x with phi_x = image['embedding'] [B, d] (output_kind 'embedding').

  Attributes:
    rank: 0 = full d x d matrix; r > 0 = identity plus a rank-r update.
    init_std: std of the matrix-predicting fc kernel (small: T_t ~ I at init).
  """
  rank: int = 0
  init_std: float = 1e-3
  output_kind = "embedding"

  @nn.compact
  def __call__(self, image, text, train: bool = False):
    del train
    x, t = image["embedding"], text["pooled"]
    b, d = x.shape
    fc = lambda n, name: nn.Dense(n, kernel_init=nn.initializers.normal(self.init_std),
                                  name=name)(t)
    if self.rank < 0:
      raise ValueError(f"attribute_operator rank must be >= 0, got {self.rank}")
    if self.rank == 0:
      delta = fc(d * d, "operator_fc").reshape(b, d, d)
      out = x + jnp.einsum("bij,bj->bi", delta, x)
    else:
      u = fc(d * self.rank, "operator_u").reshape(b, d, self.rank)
      v = fc(d * self.rank, "operator_v").reshape(b, d, self.rank)
      out = x + jnp.einsum("bir,bjr,bj->bi", u, v, x)
    return out, {}
