"""FiLM: text-predicted feature-wise affine modulation inside the image CNN.

TIRG paper, section 3.1: "FiLM [37] ... the text feature phi_t is used to
predict modulation features gamma_i, beta_i in R^C, where i indexes the layer
and C is the number of feature maps. Then it performs a feature-wise affine
transformation of the image features, phi^i_xt = gamma_i * phi^i_x + beta_i.
As stated in [37], a FiLM layer only handles a simple operation ... it has to
be used in every layer of the CNN." Original method: Perez, Strub, de Vries,
Dumoulin and Courville, "FiLM: Visual Reasoning with a General Conditioning
Layer", AAAI 2018.

Where: by default on the output of EVERY residual block of the ResNet (the
image encoder's `modulate(block, num_blocks, x)` hook, `cir_jax.models.hf_resnet`),
each block i with its own generator (gamma_i, beta_i) = fc_i(phi_t), so
phi^i_xt = gamma_i * phi^i_x + beta_i is what block i + 1 reads. `blocks`
selects a subset (negative indices count from the end); `blocks=(-1,)` is the
single-layer variant: the last block's output is the encoder's output map, and
since only average pooling follows, it is an fc-level affine map.

Difference from Perez et al.: their FiLM'ed residual block modulates inside the
block, after the second batch norm and before the ReLU and the skip addition;
we modulate each block's output (the paper's phi^i_x, "the features of layer
i"), which leaves the ImageNet-shaped block internals and the checkpoint
layout untouched (docs/fidelity.md).

As in Perez et al. (appendix, "we predict delta-gamma"), the generator outputs
gamma - 1, so zero generator weights give the identity modulation.
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp


class FiLMGenerator(nn.Module):
  """phi_t [B, d] -> (gamma, beta), each [B, C], for a feature map of C channels."""

  @nn.compact
  def __call__(self, text_feature, num_channels: int):
    out = nn.Dense(2 * num_channels, name="fc")(text_feature)
    delta_gamma, beta = jnp.split(out, 2, axis=-1)
    return 1.0 + delta_gamma, beta


def film(x, gamma, beta):
  """Feature-wise affine map: x [B, h, w, C], gamma/beta [B, C] -> [B, h, w, C]."""
  return gamma[:, None, None, :].astype(x.dtype) * x + beta[:, None, None, :].astype(x.dtype)


class FiLM(nn.Module):
  """FiLM composer (output_kind 'feature_map').

  `backbone_modulation(text)` returns the hook the retrieval model hands to the
  image encoder; `__call__` returns the (already modulated) output feature map,
  which the retrieval model pools and projects with the head shared with
  target images.

  Attributes:
    blocks: residual blocks to modulate, indices over the whole network
      (negative = from the end); None = every block (the paper's FiLM).
  """
  blocks: Optional[Sequence[int]] = None
  output_kind = "feature_map"
  modulates_backbone = True

  def _selected(self, block: int, num_blocks: int) -> bool:
    if self.blocks is None:
      return True
    return any(b == block or b + num_blocks == block for b in self.blocks)

  @nn.compact
  def _generate(self, block: int, pooled, num_channels: int):
    return FiLMGenerator(name=f"film_{block}")(pooled, num_channels)

  def backbone_modulation(self, text, train: bool = False):
    """Returns modulate(block, num_blocks, x) for the image encoder; x [B, h, w, C] -> same."""
    del train
    if self.blocks is not None and not self.blocks:
      raise ValueError("film composer option 'blocks' is empty; give block indices or None "
                       "(every block)")
    pooled = text["pooled"]

    def modulate(block, num_blocks, x):
      if self.is_initializing():
        bad = [b for b in (self.blocks or ()) if not -num_blocks <= b < num_blocks]
        if bad:
          raise ValueError(f"film blocks {bad} do not exist: the image encoder has "
                           f"{num_blocks} residual blocks (valid indices "
                           f"{-num_blocks}..{num_blocks - 1})")
      if not self._selected(block, num_blocks):
        return x
      gamma, beta = self._generate(block, pooled, x.shape[-1])
      return film(x, gamma, beta)

    return modulate

  def __call__(self, image, text, train: bool = False):
    """Returns (feature map [B, h, w, C], aux): the modulation happened in the encoder."""
    del text, train
    return image["feature_map"], {}
