"""Thin adapters giving the pretrained towers the retrieval model's dict interface.

The pretrained modules (`clip.py`, `bert.py`, `hf_resnet.py`) return
`(embedding, aux)` tuples named after transformers; the retrieval model and the
composers read plain dicts (see `cir_jax.models.composers`):

  image: 'pooled' [B, C], 'feature_map' [B, h, w, C] (CNNs) or 'tokens'
         [B, 1 + N, C] (ViTs, CLS first), and for CLIP 'projected' [B, d]
         (the joint-space embedding after `visual_projection`);
  text:  'pooled' [B, H], 'tokens' [B, L, H], 'mask' [B, L] bool, and for CLIP
         'projected' [B, d].

Each adapter holds the pretrained module as its submodule `encoder`, so its
parameters live at `<tower>/encoder/...` (e.g. `image_encoder/encoder/...`),
and names the checkpoint `family` of `cir_jax.pretrained` that fills them
(`cir_jax.init_from`). It also carries the pixel statistics its checkpoint was
trained with, which the retrieval model uses to normalise uint8 images.

`frozen=True` runs the tower as a fixed feature extractor: BatchNorm uses its
running statistics and no gradient flows into it (CIRPLANT's pre-extracted
ResNet-152 features). Freezing the *updates* of a tower is the optimizer's job
(`optimizer.freeze`); both are needed for a fixed ResNet.
"""
from typing import Any, Optional

import flax.linen as nn
import jax

# CLIP's preprocessing statistics (openai/CLIP `_transform`, HF CLIPImageProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _maybe_freeze(out: dict, frozen: bool) -> dict:
  return jax.tree.map(jax.lax.stop_gradient, out) if frozen else out


def _no_modulation(modulate, name):
  if modulate is not None:
    raise ValueError(f"image encoder {name} has no backbone-modulation hook; choose a composer "
                     f"without modulates_backbone (e.g. not FiLM) or a resnet*/hf_resnet* encoder")


class CLIPImageEncoder(nn.Module):
  """CLIP ViT tower -> dict 'pooled', 'tokens', 'projected'.

  Attributes:
    encoder: a `clip.CLIPVisionEncoder`.
    frozen: stop gradients at the output (fixed feature extractor).
  """
  encoder: nn.Module
  frozen: bool = False
  family = "clip_vision"
  pixel_mean = CLIP_MEAN
  pixel_std = CLIP_STD

  def __call__(self, images, train: bool = False, modulate=None):
    """images: float [B, S, S, 3], CLIP-normalised -> dict (see the module docstring).

    'tokens' [B, 1 + N, hidden] is the encoder output before `post_layernorm`
    (transformers' `last_hidden_state`, what SSN's token features are).
    """
    _no_modulation(modulate, "clip")
    projected, aux = self.encoder(images, train=train and not self.frozen)
    out = {"pooled": aux["pooled"], "tokens": aux["tokens"], "projected": projected}
    return _maybe_freeze(out, self.frozen)


class HFResNetImageEncoder(nn.Module):
  """HF-layout ResNet -> dict 'pooled', 'feature_map'.

  Attributes:
    encoder: a `hf_resnet.HFResNet`.
    frozen: BatchNorm in inference mode and no gradient (fixed features).
  """
  encoder: nn.Module
  frozen: bool = False
  family = "resnet"
  pixel_mean = IMAGENET_MEAN
  pixel_std = IMAGENET_STD

  def __call__(self, images, train: bool = False, modulate=None):
    """images: float [B, H, W, 3], ImageNet-normalised -> dict 'pooled', 'feature_map'."""
    if self.frozen and modulate is not None:
      raise ValueError("a frozen image encoder cannot be modulated by the text")
    _, aux = self.encoder(images, train=train and not self.frozen, modulate=modulate)
    return _maybe_freeze({"pooled": aux["pooled"], "feature_map": aux["feature_map"]},
                         self.frozen)


class CLIPResNetImageEncoder(nn.Module):
  """CLIP modified-ResNet tower (RN50, RN50x4) -> dict 'pooled', 'feature_map', 'projected'.

  'projected' [B, d] is the attention-pooled joint-space embedding (what CLIP4Cir
  uses); 'pooled' [B, C] the mean of 'feature_map' [B, h, w, C], the last stage.

  Attributes:
    encoder: a `clip_resnet.ModifiedResNet`.
    frozen: BatchNorm in inference mode and no gradient (fixed features).
  """
  encoder: nn.Module
  frozen: bool = False
  family = "clip_resnet"
  pixel_mean = CLIP_MEAN
  pixel_std = CLIP_STD

  def __call__(self, images, train: bool = False, modulate=None):
    """images: float [B, S, S, 3], CLIP-normalised -> dict (see above)."""
    if self.frozen and modulate is not None:
      raise ValueError("a frozen image encoder cannot be modulated by the text")
    projected, aux = self.encoder(images, train=train and not self.frozen, modulate=modulate)
    out = {"pooled": aux["pooled"], "feature_map": aux["feature_map"], "projected": projected}
    return _maybe_freeze(out, self.frozen)


class CLIPTextEncoder(nn.Module):
  """CLIP text tower -> dict 'pooled', 'tokens', 'mask', 'projected'.

  Attributes:
    encoder: a `clip.CLIPTextEncoder`.
    frozen: stop gradients at the output.
  """
  encoder: nn.Module
  frozen: bool = False
  family = "clip_text"

  def __call__(self, ids, mask, train: bool = False):
    """ids, mask: [B, L] CLIP BPE ids (EOS included) -> dict."""
    projected, aux = self.encoder(ids, mask, train=train)
    out = {"pooled": aux["pooled"], "tokens": aux["tokens"], "mask": aux["mask"],
           "projected": projected}
    return _maybe_freeze(out, self.frozen)


class BertTextEncoder(nn.Module):
  """BERT -> dict 'pooled', 'tokens', 'mask' (tokens/mask include extra tokens).

  Attributes:
    encoder: a `bert.BertEncoder`.
    frozen: stop gradients at the output.
  """
  encoder: nn.Module
  frozen: bool = False
  family = "bert"

  def __call__(self, ids, mask, train: bool = False,
               extra_embeddings: Optional[Any] = None):
    """ids, mask: [B, L] WordPiece ids; extra_embeddings: optional [B, E, H] tokens
    appended after the text (CIRPLANT's image token) -> dict with tokens [B, L + E, H]."""
    pooled, aux = self.encoder(ids, mask, extra_embeddings=extra_embeddings, train=train)
    out = {"pooled": pooled, "tokens": aux["tokens"], "mask": aux["mask"]}
    return _maybe_freeze(out, self.frozen)
