"""FiLM: text-predicted feature-wise affine modulation inside the image CNN.

TIRG paper, section 3.1: "FiLM [37] ... the text feature phi_t is used to
predict modulation features gamma_i, beta_i in R^C, where i indexes the layer
and C is the number of feature maps. Then it performs a feature-wise affine
transformation of the image features, phi^i_xt = gamma_i * phi^i_x + beta_i."
Original method: Perez, Strub, de Vries, Dumoulin and Courville, "FiLM: Visual
Reasoning with a General Conditioning Layer", AAAI 2018.

Where the modulation happens: at the end of each ResNet stage named in
`stages` (the image encoder's `modulate(stage, x)` hook, see
`cir_jax.models.resnet.ResNet`), so every later layer sees the modulated map.
Perez et al. put FiLM inside each residual block after its batch norm; the TIRG
paper modulates "one layer" for its comparison, which is our default
`stages=(-1,)`: -1 (any negative index) means the end of the LAST stage, i.e.
the encoder's output feature map, and is applied in `__call__` on
`image['feature_map']` -- nothing but pooling follows the last stage, so this is
exactly the hook at the last stage without needing to know how many stages the
encoder has. Non-negative indices go through the backbone hook.

As in Perez et al. (appendix, "we predict delta-gamma"), the generator outputs
gamma - 1, so zero generator weights give the identity modulation.
"""
from typing import Sequence

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
  image encoder; `__call__` applies the last-stage modulation (if -1 is in
  `stages`) and returns the modulated output feature map, which the retrieval
  model pools and projects with the head shared with target images.

  Attributes:
    stages: stage indices to modulate; negative = the last stage (default).
  """
  stages: Sequence[int] = (-1,)
  output_kind = "feature_map"
  modulates_backbone = True

  def setup(self):
    if not self.stages:
      raise ValueError("film needs at least one stage in composer option 'stages'")
    if sum(s < 0 for s in self.stages) > 1:
      raise ValueError(f"film stages={tuple(self.stages)}: give the last stage (-1) at most once")
    # One generator per modulated stage; its width is inferred from the feature map.
    self.generators = {
        ("last" if s < 0 else str(s)): FiLMGenerator(name=f"film_{'last' if s < 0 else s}")
        for s in self.stages}

  def backbone_modulation(self, text, train: bool = False):
    """Returns modulate(stage, x) for the image encoder; x [B, h, w, C] -> same shape."""
    del train
    pooled = text["pooled"]

    def modulate(stage, x):
      generator = self.generators.get(str(stage))
      if generator is None:
        return x
      gamma, beta = generator(pooled, x.shape[-1])
      return film(x, gamma, beta)

    return modulate

  def __call__(self, image, text, train: bool = False):
    """Returns (feature map [B, h, w, C], aux) with the last-stage modulation applied."""
    del train
    if self.is_initializing():
      # A stage the encoder does not have would never be modulated: fail loudly.
      missing = [k for k, g in self.generators.items() if k != "last" and not g.variables]
      if missing:
        raise ValueError(f"film stages {missing} were never reached by the image encoder "
                         f"(stages={tuple(self.stages)}); use indices of its stages or -1")
    x = image["feature_map"]
    last = self.generators.get("last")
    if last is None:  # every modulation already happened inside the backbone
      return x, {}
    gamma, beta = last(text["pooled"], x.shape[-1])
    return film(x, gamma, beta), {"gamma_mean": gamma.mean()}
