"""MRN: Multimodal Residual Networks (fc-level, element-wise joint residuals).

TIRG paper, section 3.1: "starting with phi^0_xt = phi_t, each of its block
layer is defined as phi^i_xt = phi^{i-1}_xt + fc(tanh(phi^{i-1}_xt)) *
fc(tanh(fc(tanh(phi_x)))). The last feature is linearly transformed to obtain
the image text composition output." Original method: Kim, Lee, Kwak, Kim, Ha,
Kim and Zhang, "Multimodal Residual Learning for Visual QA", NIPS 2016 (three
blocks there, our default). Kim et al.'s shortcut is a linear map of the
question vector; the TIRG formulation above uses the identity, as here.
"""
import flax.linen as nn
import jax.numpy as jnp


class MRN(nn.Module):
  """phi_t [B, d], phi_x [B, d] -> [B, embed_dim] (output_kind 'embedding').

  Attributes:
    embed_dim: output width d.
    num_blocks: number of joint residual blocks (Kim et al.: 3).
  """
  embed_dim: int = 512
  num_blocks: int = 3
  output_kind = "embedding"

  @nn.compact
  def __call__(self, image, text, train: bool = False):
    del train
    if self.num_blocks < 1:
      raise ValueError(f"mrn needs num_blocks >= 1, got {self.num_blocks}")
    phi_x = jnp.tanh(image["embedding"])
    phi = text["pooled"]
    width = phi.shape[-1]
    for i in range(self.num_blocks):
      visual = nn.Dense(width, name=f"block{i}_image_fc2")(
          jnp.tanh(nn.Dense(width, name=f"block{i}_image_fc1")(phi_x)))
      phi = phi + nn.Dense(width, name=f"block{i}_text_fc")(jnp.tanh(phi)) * visual
    return nn.Dense(self.embed_dim, name="out")(phi), {}
