"""Builds the retrieval model named by a config (`config.model`)."""
import dataclasses
from typing import Callable

import jax.numpy as jnp

from cir_jax.models import composers
from cir_jax.models import resnet
from cir_jax.models import retrieval_model
from cir_jax.models import text_lstm

IMAGE_ENCODERS: dict[str, Callable] = {
    "resnet18": resnet.ResNet18,
    "resnet34": resnet.ResNet34,
    "resnet_small": resnet.ResNetSmall,
    "resnet_tiny": resnet.ResNetTiny,
}

TEXT_ENCODERS: dict[str, Callable] = {
    "lstm": text_lstm.LSTMTextEncoder,
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _pick(table, kind, name):
  if name not in table:
    raise ValueError(f"unknown {kind} {name!r}; valid {kind}s: {sorted(table)}")
  return table[name]


def build_image_encoder(model_config):
  dtype = _pick(DTYPES, "dtype", model_config.dtype)
  return _pick(IMAGE_ENCODERS, "image encoder", model_config.image_encoder)(dtype=dtype)


def build_model(model_config, vocab_size: int) -> retrieval_model.RetrievalModel:
  """Returns the RetrievalModel of `model_config` for a vocabulary of `vocab_size` words."""
  text_encoder = _pick(TEXT_ENCODERS, "text encoder", model_config.text_encoder)(
      vocab_size=vocab_size, word_dim=model_config.word_dim,
      hidden_dim=model_config.text_hidden_dim, out_dim=model_config.embed_dim)
  if model_config.composer not in composers.COMPOSERS:
    composers.get_composer(model_config.composer)  # raises with the list of valid names
  composer_cls = composers.COMPOSERS[model_config.composer]
  kwargs = dict(model_config.get("composer_kwargs", {}))
  field_names = {f.name for f in dataclasses.fields(composer_cls)}
  if "embed_dim" in field_names:
    kwargs.setdefault("embed_dim", model_config.embed_dim)
  unknown = set(kwargs) - field_names
  if unknown:
    raise ValueError(f"composer {model_config.composer!r} has no options {sorted(unknown)}; "
                     f"it takes {sorted(field_names - {'parent', 'name'})}")
  return retrieval_model.RetrievalModel(
      image_encoder=build_image_encoder(model_config),
      text_encoder=text_encoder,
      composer=composers.get_composer(model_config.composer, **kwargs),
      embed_dim=model_config.embed_dim,
      query_image_encoder=(build_image_encoder(model_config)
                           if model_config.separate_query_encoder else None),
      init_scale=model_config.init_scale,
  )
