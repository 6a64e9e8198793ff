"""CLIP4Cir (Baldrati et al., CVPR-W 2022): stage 1's element-wise sum and stage 2's Combiner.

Stage 1 (`ElementwiseSum`, composer 'clip4cir_sum') fine-tunes both CLIP
encoders with query = normalize(psi_I + psi_T) (CLIP4Cir utils.element_wise_sum);
stage 2 (`Combiner`, composer 'combiner') trains the Combiner on the frozen
stage-1 encoders (configs/combiner_stage1_*.py hand over by `init_from`).

Composes the CLIP embeddings of the reference image (psi_I) and the text (psi_T):

  p_I, p_T = dropout(relu(W_I psi_I)), dropout(relu(W_T psi_T))    # projection layers
  h        = [p_T; p_I]
  lambda   = sigmoid(MLP_gate(h))            # a dynamic scalar per example
  out      = W_out dropout(relu(W_c h)) + lambda psi_T + (1 - lambda) psi_I

i.e. a learned convex mix of the two CLIP embeddings plus an MLP residual on
the concatenation. Every dropout is 0.5. Widths follow CLIP4Cir's training
script: projection = 4x and hidden = 8x the CLIP feature width (2560 / 5120 for
RN50x4's 640; 2048 / 4096 for ViT-B's 512). The inputs are the *unnormalised*
projected CLIP features; the target side is the target image's CLIP embedding
(normalised by the retrieval model), the loss temperature-scaled cross-entropy
with logit scale 100.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp


class Combiner(nn.Module):
  """(image dict with 'projected' [B, d], text dict with 'projected' [B, d]) -> [B, d].

  Attributes:
    projection_dim: width of the two projection layers; 0 = 4 * d.
    hidden_dim: width of the combiner and gate layers; 0 = 8 * d.
    dropout: dropout rate of every dropout layer (0.5 in CLIP4Cir).
  """
  projection_dim: int = 0
  hidden_dim: int = 0
  dropout: float = 0.5
  output_kind = "embedding"

  @nn.compact
  def __call__(self, image, text, train: bool = False):
    img, txt = image["projected"], text["projected"]
    d = img.shape[-1]
    proj_dim = self.projection_dim or 4 * d
    hidden = self.hidden_dim or 8 * d
    drop = lambda x: nn.Dropout(self.dropout, deterministic=not train)(x)
    p_txt = drop(nn.relu(nn.Dense(proj_dim, name="text_projection_layer")(txt)))
    p_img = drop(nn.relu(nn.Dense(proj_dim, name="image_projection_layer")(img)))
    h = jnp.concatenate([p_txt, p_img], axis=-1)
    combined = drop(nn.relu(nn.Dense(hidden, name="combiner_layer")(h)))
    gate = drop(nn.relu(nn.Dense(hidden, name="dynamic_scalar_0")(h)))
    lam = jax.nn.sigmoid(nn.Dense(1, name="dynamic_scalar_1")(gate))
    out = nn.Dense(d, name="output_layer")(combined) + lam * txt + (1 - lam) * img
    return out, {"lambda": lam[:, 0]}

  def encode_target(self, image, train: bool = False):
    """Targets are the CLIP image embeddings themselves: dict -> [B, d]."""
    del train
    return image["projected"]


class ElementwiseSum(nn.Module):
  """CLIP4Cir stage 1: psi_I + psi_T ([B, d]; the retrieval model normalises it).

  Targets are the CLIP image embeddings (normalised by the retrieval model), as
  in CLIP4Cir's clip_fine_tune.py. No parameters: only the CLIP towers train.
  """
  output_kind = "embedding"

  @nn.compact
  def __call__(self, image, text, train: bool = False):
    del train
    return image["projected"] + text["projected"], {}

  def encode_target(self, image, train: bool = False):
    del train
    return image["projected"]
