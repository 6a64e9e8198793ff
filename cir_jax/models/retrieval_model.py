"""The retrieval model: image encoder + text encoder + composer + target head.

query  = scale * normalize(compose(image_encoder(reference), text_encoder(text)))
target = scale * normalize(proj(pool(image_encoder(target))))

`scale` is the learnable normalisation scale of google/tirg (init 4.0). CLIP-style
methods (Combiner, SSN) put their scale in the loss temperature instead; they
set `learn_scale=False, init_scale=1` so similarities are plain cosines and the
temperature is not multiplied by a second, learned scale. With
`query_image_encoder` set, reference images get their own encoder and head (the
2D->3D setting of the TIRG paper, Table 4); otherwise both sides share them.

Composer hooks (see `cir_jax.models.composers`):
* `encode_target(image, train)`: the composer owns the target side (SSN passes
  target tokens through its fusion layer, CIRPLANT and the Combiner use their
  own projections); the `proj` head is then not used at all.
* `joint_text_image = True` with `image_tokens(image, train)`: the text encoder
  reads the reference image as extra tokens (CIRPLANT's OSCAR input).

Precomputed features of frozen towers (cir_jax/feature_cache.py): every encode
method also takes the tower's output dict instead of its input, so training from
cached features runs exactly the code below minus the towers.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cir_jax.models import adapters

# Pixels arrive as uint8 and are normalised on device (4x less host->device traffic).
IMAGENET_MEAN = adapters.IMAGENET_MEAN
IMAGENET_STD = adapters.IMAGENET_STD


def normalize_pixels(images, mean: Sequence[float] = IMAGENET_MEAN,
                     std: Sequence[float] = IMAGENET_STD):
  """uint8 [B, H, W, 3] -> float32, normalised with the encoder's mean/std (ImageNet default)."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean)) / jnp.asarray(std)


def l2_normalize(x, eps=1e-8):
  """Unit-norm rows: [B, d] -> [B, d]."""
  return x * jnp.reciprocal(jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps))


def _pixels(encoder, images):
  return normalize_pixels(images, getattr(encoder, "pixel_mean", IMAGENET_MEAN),
                          getattr(encoder, "pixel_std", IMAGENET_STD))


class RetrievalModel(nn.Module):
  """Composed-query and target encoders sharing one embedding space.

  Attributes:
    image_encoder: images [B, H, W, 3] -> dict 'feature_map' or 'tokens', 'pooled'.
    text_encoder: (ids [B, L], mask [B, L]) -> dict 'pooled' [B, d], ...
    composer: see cir_jax.models.composers.
    embed_dim: d, the embedding width.
    query_image_encoder: optional separate encoder for reference images.
    init_scale: initial value of the normalisation scale.
    learn_scale: learn the scale (TIRG); False keeps it at `init_scale`.
  """
  image_encoder: nn.Module
  text_encoder: nn.Module
  composer: nn.Module
  embed_dim: int = 512
  query_image_encoder: Optional[nn.Module] = None
  init_scale: float = 4.0
  learn_scale: bool = True

  def setup(self):
    self.target_proj = nn.Dense(self.embed_dim)
    self.query_proj = nn.Dense(self.embed_dim) if self.query_image_encoder is not None else None
    if self.learn_scale:
      self.norm_scale = self.param("norm_scale", nn.initializers.constant(self.init_scale), (),
                                   jnp.float32)
    else:
      self.norm_scale = jnp.asarray(self.init_scale, jnp.float32)

  def _finish(self, x):
    return self.norm_scale * l2_normalize(x.astype(jnp.float32))

  def _composer_owns_target(self) -> bool:
    return hasattr(self.composer, "encode_target")

  def encode_target(self, images, train: bool = False, features=None):
    """uint8 [B, H, W, 3] -> target embeddings [B, d] (normalised and scaled).

    `features`: the image tower's dict for these images (a frozen tower's cached
    output); then `images` is not read (pass None).
    """
    if features is None:
      features = self.image_encoder(_pixels(self.image_encoder, images), train=train)
    if self._composer_owns_target():
      return self._finish(self.composer.encode_target(features, train=train))
    return self._finish(self.target_proj(features["pooled"]))

  def encode_query(self, images, text_ids, text_mask, train: bool = False,
                   image_features=None, text_features=None):
    """Composes reference images [B, H, W, 3] with texts [B, L] -> ([B, d], aux).

    `image_features` / `text_features`: the (frozen) towers' dicts for these
    inputs, used instead of running the towers; `images` / `text_ids`,
    `text_mask` are then not read.
    """
    encoder = self.query_image_encoder or self.image_encoder
    proj = self.query_proj or self.target_proj
    if getattr(self.composer, "joint_text_image", False):
      if text_features is not None:
        raise ValueError(f"composer {type(self.composer).__name__} feeds the image into the "
                         f"text encoder (joint_text_image): its text features cannot be cached")
      # The text encoder sees the image as extra tokens, so the image comes first.
      image = (image_features if image_features is not None
               else encoder(_pixels(encoder, images), train=train))
      text = self.text_encoder(text_ids, text_mask, train=train,
                               extra_embeddings=self.composer.image_tokens(image, train=train))
    else:
      text = (text_features if text_features is not None
              else self.text_encoder(text_ids, text_mask, train=train))
      if image_features is not None:
        if getattr(self.composer, "modulates_backbone", False):
          raise ValueError(f"composer {type(self.composer).__name__} modulates the image "
                           f"backbone with the text: its image features cannot be cached")
        image = image_features
      else:
        modulate = None
        if getattr(self.composer, "modulates_backbone", False):
          modulate = self.composer.backbone_modulation(text, train=train)
        image = encoder(_pixels(encoder, images), train=train, modulate=modulate)
    if not self._composer_owns_target():
      image = dict(image, embedding=proj(image["pooled"]))
    out, aux = self.composer(image, text, train=train)
    if self.composer.output_kind == "feature_map":
      out = proj(out.mean(axis=(1, 2)))
    elif self.composer.output_kind != "embedding":
      raise ValueError(f"composer output_kind must be 'embedding' or 'feature_map', "
                       f"got {self.composer.output_kind!r}")
    # Extra query branches (SSN's negative branch) live in the same space.
    aux = {k: self._finish(v) if k.endswith("_query") else v for k, v in aux.items()}
    return self._finish(out), aux

  def __call__(self, batch: dict[str, Any], train: bool = False):
    """batch with 'ref_image', 'text_ids', 'text_mask', 'target_image' -> (query, target, aux).

    With 'set_negative_images' [B, S, H, W, 3] and 'set_negative_mask' [B, S] in the
    batch (config.loss.set_negatives > 0), the extra negatives go through the target
    path too: aux 'set_negatives' [B, S, D] and 'set_negative_mask' [B, S].

    Cached features of frozen towers (cir_jax/feature_cache.py) replace inputs:
    'ref_features', 'target_features' (image dicts, leaves [B, ...]) instead of
    'ref_image', 'target_image'; 'text_features' (text dict) instead of running the
    text tower on 'text_ids', 'text_mask'; 'set_negative_features' (leaves [B, S, ...])
    instead of 'set_negative_images'.
    """
    query, aux = self.encode_query(batch.get("ref_image"), batch.get("text_ids"),
                                   batch.get("text_mask"), train=train,
                                   image_features=batch.get("ref_features"),
                                   text_features=batch.get("text_features"))
    target = self.encode_target(batch.get("target_image"), train=train,
                                features=batch.get("target_features"))
    aux = dict(aux, scale=self.norm_scale)
    if "set_negative_images" in batch or "set_negative_features" in batch:
      if "set_negative_features" in batch:
        features = batch["set_negative_features"]
        b, s = jax.tree.leaves(features)[0].shape[:2]
        negatives = self.encode_target(None, train=train, features=jax.tree.map(
            lambda x: x.reshape((b * s,) + x.shape[2:]), features))
      else:
        images = batch["set_negative_images"]
        b, s = images.shape[:2]
        negatives = self.encode_target(images.reshape((b * s,) + images.shape[2:]), train=train)
      aux.update(set_negatives=negatives.reshape(b, s, -1),
                 set_negative_mask=batch["set_negative_mask"])
    return query, target, aux
