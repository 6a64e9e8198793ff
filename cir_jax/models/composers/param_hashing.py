"""Parameter hashing: the text predicts a hashed fc layer applied to the image feature.

TIRG paper, section 3.1: "Parameter hashing [35] ... the encoded text feature
phi_t is hashed into a transformation matrix T_t, which can be applied to image
feature; it is used to replace a fc layer in the image CNN, which now outputs a
representation phi_xt that takes into account both image and text feature."
Original method: Noh, Seo and Han, "Image Question Answering using
Convolutional Neural Network with Dynamic Parameter Prediction", CVPR 2016
(DPPnet): a parameter prediction network maps the question to a candidate
weight vector p in R^K, and the weights of a dynamic fc layer are
W[i, j] = xi(i, j) * p[h(i, j)], with h a hash into {0..K-1} and xi a sign
hash in {-1, +1} (the hashing trick of Chen et al. 2015, "HashedNets").

Here p = fc(phi_t) [B, K] (the learnable part), h and xi are fixed tables drawn
from `hash_seed` (constants of the computation, not parameters), and
phi_xt = W phi_x with phi_x = image['pooled'] [B, C] (the ResNet's pooled
feature, 512 for ResNet-18) and W [B, d, C].

Which fc it replaces: TIRG's image CNN (google/tirg) is ResNet-18 whose last
layer `fc` (512 -> d, our `target_proj`) maps the pooled feature into the
shared space. On the query side the hashed W takes that fc's place: the
reference image's pooled feature goes through W(phi_t) instead of through the
fc, so the query never passes the target projection; targets still use the fc.
Differences from DPPnet: it replaces VGG's fc7 and adds a learned bias; our
replacement layer has no bias (the paper does not mention one).
"""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def hash_tables(rows: int, cols: int, pool_size: int, seed: int):
  """Fixed hashes of a [rows, cols] matrix: (index int32 in [0, K), sign float32 in {-1, 1})."""
  rng = np.random.default_rng(seed)
  index = rng.integers(0, pool_size, (rows, cols), dtype=np.int32)
  sign = np.where(rng.random((rows, cols)) < 0.5, -1.0, 1.0).astype(np.float32)
  return index, sign


def hashed_weights(pool, index, sign):
  """W[b, i, j] = sign[i, j] * pool[b, index[i, j]]: pool [B, K] -> [B, rows, cols]."""
  return jnp.asarray(sign) * jnp.take(pool, jnp.asarray(index), axis=1)


class ParamHashing(nn.Module):
  """phi_xt = W(phi_t) phi_x, W hashed from a text-predicted pool, replacing the image fc.

  Reads image['pooled'] [B, C] and text['pooled'] [B, d_t]; returns [B, embed_dim]
  in the target space (output_kind 'embedding').

  Attributes:
    embed_dim: output width d.
    pool_size: K, the number of free weights per text (DPPnet's candidate
      weights); d*d / K weights share each one.
    hash_seed: seed of the fixed hash and sign tables.
  """
  embed_dim: int = 512
  pool_size: int = 4096
  hash_seed: int = 0
  output_kind = "embedding"

  @nn.compact
  def __call__(self, image, text, train: bool = False):
    del train
    if self.pool_size < 1:
      raise ValueError(f"param_hashing needs pool_size >= 1, got {self.pool_size}")
    x = image["pooled"]   # the fc's input: the hashed layer replaces target_proj
    # Scaled so W phi_x starts with about the variance of phi_x (W has d_in inputs).
    pool = nn.Dense(self.pool_size, name="pool_fc",
                    kernel_init=nn.initializers.variance_scaling(
                        1.0 / x.shape[-1], "fan_in", "normal"))(text["pooled"])
    index, sign = hash_tables(self.embed_dim, x.shape[-1], self.pool_size, self.hash_seed)
    w = hashed_weights(pool, index, sign)                         # [B, d, C]
    return jnp.einsum("bij,bj->bi", w, x), {"pool_rms": jnp.sqrt(jnp.mean(pool**2))}
