"""The simplest composers of the TIRG paper (section 3.1): image only, text only, concat."""
import flax.linen as nn
import jax.numpy as jnp


class ImageOnly(nn.Module):
  """phi_xt = phi_x: ignores the text (the paper's lower bound, ~6 R@1 on CSS)."""
  output_kind = "embedding"

  @nn.compact
  def __call__(self, image, text, train: bool = False):
    del text, train
    return image["embedding"], {}


class TextOnly(nn.Module):
  """phi_xt = phi_t: ignores the reference image."""
  output_kind = "embedding"

  @nn.compact
  def __call__(self, image, text, train: bool = False):
    del image, train
    return text["pooled"], {}


class Concat(nn.Module):
  """phi_xt = MLP([phi_x, phi_t]): two layers with ReLU, batch norm and dropout 0.1.

  Layer order as in google/tirg: BN -> ReLU -> fc(2d) -> BN -> ReLU -> dropout -> fc(d).
  """
  embed_dim: int = 512
  dropout: float = 0.1
  output_kind = "embedding"

  @nn.compact
  def __call__(self, image, text, train: bool = False):
    x = jnp.concatenate([image["embedding"], text["pooled"]], axis=-1)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = nn.Dense(2 * self.embed_dim)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.embed_dim)(x), {}

