"""Composers: (reference-image features, text features) -> query embedding.

Every composer is a Flax module called as `composer(image, text, train)` with
  image: dict 'feature_map' [B, h, w, C], 'pooled' [B, C], 'embedding' [B, d]
  text:  dict 'pooled' [B, d], 'tokens' [B, L, H], 'word_embeddings' [B, L, E], 'mask' [B, L]
and returns `(out, aux)`. Its class attribute `output_kind` says what `out` is:
'embedding' ([B, d], in the target space) or 'feature_map' ([B, h, w, C], which
the retrieval model pools and projects with the same head as target images).
A composer may also set `modulates_backbone = True` and provide
`backbone_modulation(text, train)` returning a `modulate(stage, x)` hook for the
image encoder (FiLM).

Choose one by name with `get_composer(name, **kwargs)`.
"""
from typing import Callable

from cir_jax.models.composers import basic
from cir_jax.models.composers import tirg

COMPOSERS: dict[str, Callable] = {
    "image_only": basic.ImageOnly,
    "text_only": basic.TextOnly,
    "concat": basic.Concat,
    "tirg": tirg.TIRG,
    "tirg_lastconv": tirg.TIRGLastConv,
}


def get_composer(name: str, **kwargs):
  """Returns the composer module `name` built with `kwargs` (its config fields)."""
  if name not in COMPOSERS:
    raise ValueError(f"unknown composer {name!r}; valid composers: {sorted(COMPOSERS)}")
  return COMPOSERS[name](**kwargs)
