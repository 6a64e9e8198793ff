"""The retrieval model: image encoder + text encoder + composer + target head.

query  = scale * normalize(compose(image_encoder(reference), text_encoder(text)))
target = scale * normalize(proj(pool(image_encoder(target))))

`scale` is the learnable normalisation scale of google/tirg (init 4.0). With
`query_image_encoder` set, reference images get their own encoder and head (the
2D->3D setting of the TIRG paper, Table 4); otherwise both sides share them.
"""
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

# Pixels arrive as uint8 and are normalised on device (4x less host->device traffic).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_pixels(images):
  """uint8 [B, H, W, 3] -> float32, ImageNet mean/std normalised."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def l2_normalize(x, eps=1e-8):
  """Unit-norm rows: [B, d] -> [B, d]."""
  return x * jnp.reciprocal(jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps))


class RetrievalModel(nn.Module):
  """Composed-query and target encoders sharing one embedding space.

  Attributes:
    image_encoder: images [B, H, W, 3] -> dict 'feature_map', 'pooled'.
    text_encoder: (ids [B, L], mask [B, L]) -> dict 'pooled' [B, d], ...
    composer: see cir_jax.models.composers.
    embed_dim: d, the embedding width.
    query_image_encoder: optional separate encoder for reference images.
    init_scale: initial value of the learnable normalisation scale.
  """
  image_encoder: nn.Module
  text_encoder: nn.Module
  composer: nn.Module
  embed_dim: int = 512
  query_image_encoder: Optional[nn.Module] = None
  init_scale: float = 4.0

  def setup(self):
    self.target_proj = nn.Dense(self.embed_dim)
    self.query_proj = nn.Dense(self.embed_dim) if self.query_image_encoder is not None else None
    self.norm_scale = self.param("norm_scale", nn.initializers.constant(self.init_scale), (),
                                 jnp.float32)

  def _finish(self, x):
    return self.norm_scale * l2_normalize(x.astype(jnp.float32))

  def encode_target(self, images, train: bool = False):
    """uint8 [B, H, W, 3] -> target embeddings [B, d] (normalised and scaled)."""
    features = self.image_encoder(normalize_pixels(images), train=train)
    return self._finish(self.target_proj(features["pooled"]))

  def encode_query(self, images, text_ids, text_mask, train: bool = False):
    """Composes reference images [B, H, W, 3] with texts [B, L] -> ([B, d], aux)."""
    encoder = self.query_image_encoder or self.image_encoder
    proj = self.query_proj or self.target_proj
    text = self.text_encoder(text_ids, text_mask, train=train)
    modulate = None
    if getattr(self.composer, "modulates_backbone", False):
      modulate = self.composer.backbone_modulation(text, train=train)
    image = encoder(normalize_pixels(images), train=train, modulate=modulate)
    image = dict(image, embedding=proj(image["pooled"]))
    out, aux = self.composer(image, text, train=train)
    if self.composer.output_kind == "feature_map":
      out = proj(out.mean(axis=(1, 2)))
    elif self.composer.output_kind != "embedding":
      raise ValueError(f"composer output_kind must be 'embedding' or 'feature_map', "
                       f"got {self.composer.output_kind!r}")
    return self._finish(out), aux

  def __call__(self, batch: dict[str, Any], train: bool = False):
    """batch with 'ref_image', 'text_ids', 'text_mask', 'target_image' -> (query, target, aux)."""
    query, aux = self.encode_query(batch["ref_image"], batch["text_ids"], batch["text_mask"],
                                   train=train)
    target = self.encode_target(batch["target_image"], train=train)
    return query, target, dict(aux, scale=self.norm_scale)
