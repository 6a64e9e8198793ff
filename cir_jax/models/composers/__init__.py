"""Composers: (reference-image features, text features) -> query embedding.

Every composer is a Flax module called as `composer(image, text, train)` with
  image: dict 'feature_map' [B, h, w, C], 'pooled' [B, C], 'embedding' [B, d]
  text:  dict 'pooled' [B, d], 'tokens' [B, L, H], 'word_embeddings' [B, L, E], 'mask' [B, L]
and returns `(out, aux)`. Its class attribute `output_kind` says what `out` is:
'embedding' ([B, d], in the target space) or 'feature_map' ([B, h, w, C], which
the retrieval model pools and projects with the same head as target images).
A composer may also set `modulates_backbone = True` and provide
`backbone_modulation(text, train)` returning a `modulate(block, num_blocks, x)` hook for the
image encoder (FiLM).

Composers over pretrained towers read the adapters' keys (cir_jax/models/adapters.py:
image 'tokens', 'projected'; text 'projected'). A composer that defines
`encode_target(image, train) -> [B, d]` owns the target side (the retrieval
model then adds no 'embedding' head); one with `joint_text_image = True` and
`image_tokens(image, train) -> [B, E, H]` has the text encoder read the image as
extra tokens (CIRPLANT). Extra query branches go in aux under keys ending in
'_query' (normalised like the query; SSN's 'negative_query' feeds its loss).

Choose one by name with `get_composer(name, **kwargs)`.
"""
from typing import Callable

from cir_jax.models.composers import attribute_operator
from cir_jax.models.composers import basic
from cir_jax.models.composers import cirplant
from cir_jax.models.composers import combiner
from cir_jax.models.composers import film
from cir_jax.models.composers import mrn
from cir_jax.models.composers import param_hashing
from cir_jax.models.composers import relationship
from cir_jax.models.composers import show_and_tell
from cir_jax.models.composers import ssn
from cir_jax.models.composers import tirg

COMPOSERS: dict[str, Callable] = {
    "image_only": basic.ImageOnly,
    "text_only": basic.TextOnly,
    "concat": basic.Concat,
    "tirg": tirg.TIRG,
    "tirg_lastconv": tirg.TIRGLastConv,
    # The other compositions the TIRG paper compares (section 3.1, Tables 1-4).
    "show_and_tell": show_and_tell.ShowAndTell,
    "attribute_operator": attribute_operator.AttributeOperator,
    "param_hashing": param_hashing.ParamHashing,
    "relationship": relationship.Relationship,
    "mrn": mrn.MRN,
    "film": film.FiLM,
    # Pretrained-encoder methods: CLIP4Cir's Combiner, SSN and CIRPLANT.
    "combiner": combiner.Combiner,
    "clip4cir_sum": combiner.ElementwiseSum,   # CLIP4Cir stage 1 (fine-tunes CLIP)
    "ssn": ssn.SSN,
    "cirplant": cirplant.CIRPLANT,
}


def get_composer(name: str, **kwargs):
  """Returns the composer module `name` built with `kwargs` (its config fields)."""
  if name not in COMPOSERS:
    raise ValueError(f"unknown composer {name!r}; valid composers: {sorted(COMPOSERS)}")
  return COMPOSERS[name](**kwargs)
