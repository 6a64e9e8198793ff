"""Builds the retrieval model named by a config (`config.model`).

Encoders are chosen by name. Every image tower is wrapped by
`cir_jax.models.adapters` so it returns the same dict. The ResNets (one
implementation, `cir_jax.models.hf_resnet`) train from scratch or start from a
checkpoint directory in `config.init_from` (microsoft/resnet-18 layout, or a
torchvision state dict converted by tools/convert_torchvision_resnet.py); CLIP
and BERT towers come from `config.init_from` too (see `cir_jax.init_from`); the
LSTM always trains from scratch. Pretrained text towers read ids of their own
tokenizer (`config.data.tokenizer`), not of the word vocabulary.

`model.conv_impl` is resolved here, once, with the image size
(`conv.resolve_conv_impl`) and handed to every convolution: the ResNet's and
those of a composer with a `conv_impl` field (TIRGLastConv).
"""
import dataclasses
import functools
from typing import Callable, Optional

import jax.numpy as jnp

from cir_jax.models import adapters
from cir_jax.models import bert
from cir_jax.models import clip
from cir_jax.models import clip_resnet
from cir_jax.models import composers
from cir_jax.models import conv as conv_lib
from cir_jax.models import hf_resnet
from cir_jax.models import retrieval_model
from cir_jax.models import text_lstm


def _adapted(adapter_cls, preset):
  """A factory (dtype, frozen) -> adapter around `preset(dtype=dtype)`."""
  def make(dtype, frozen=False):
    return adapter_cls(encoder=preset(dtype=dtype), frozen=frozen)
  return make


# CLIP image towers: name -> factory(dtype, frozen) -> adapter.
CLIP_IMAGE_ENCODERS: dict[str, Callable] = {
    "clip_vit_b32": _adapted(adapters.CLIPImageEncoder, clip.CLIPVisionB32),
    "clip_vit_b16": _adapted(adapters.CLIPImageEncoder, clip.CLIPVisionB16),
    "clip_vit_l14": _adapted(adapters.CLIPImageEncoder, clip.CLIPVisionL14),
    # Tiny variants for tests; projection 32 = the text width, as in ViT-B (512/512).
    "clip_vision_tiny": _adapted(adapters.CLIPImageEncoder,
                                 functools.partial(clip.CLIPVisionTiny, projection_dim=32)),
    # CLIP's modified ResNets (open_clip checkpoints, family 'clip_resnet').
    "clip_rn50": _adapted(adapters.CLIPResNetImageEncoder, clip_resnet.RN50),
    "clip_rn101": _adapted(adapters.CLIPResNetImageEncoder, clip_resnet.RN101),
    "clip_rn50x4": _adapted(adapters.CLIPResNetImageEncoder, clip_resnet.RN50x4),
    "clip_rn_tiny": _adapted(adapters.CLIPResNetImageEncoder, clip_resnet.RNTiny),
}

# ResNets (all `hf_resnet.HFResNet`, all loadable by init_from): name -> preset.
# resnet18 is the TIRG family's trunk (google/tirg: torchvision resnet18); the
# hf_* names are the bottleneck ResNets of CIRPLANT and a tiny one for tests.
RESNETS: dict[str, Callable] = {
    "resnet18": hf_resnet.ResNet18,
    "resnet34": hf_resnet.ResNet34,
    "resnet_small": hf_resnet.ResNetSmall,
    "resnet_tiny": hf_resnet.ResNetBasicTiny,
    "hf_resnet50": hf_resnet.ResNet50,
    "hf_resnet152": hf_resnet.ResNet152,
    "hf_resnet_tiny": hf_resnet.ResNetTiny,
}

# Image towers that can take weights from init_from (every one today).
PRETRAINED_IMAGE_ENCODERS: dict[str, Callable] = {**CLIP_IMAGE_ENCODERS, **RESNETS}
IMAGE_ENCODERS = PRETRAINED_IMAGE_ENCODERS

# Pretrained text towers: name -> factory(dtype, frozen) (their vocabulary is fixed).
PRETRAINED_TEXT_ENCODERS: dict[str, Callable] = {
    "clip_text": _adapted(adapters.CLIPTextEncoder, clip.CLIPTextB),
    "clip_text_l": _adapted(adapters.CLIPTextEncoder, clip.CLIPTextL),
    # Text towers of the RN CLIPs (projection = the RN image tower's output width).
    "clip_text_rn50": _adapted(adapters.CLIPTextEncoder, clip.CLIPTextRN50),
    "clip_text_rn50x4": _adapted(adapters.CLIPTextEncoder, clip.CLIPTextRN50x4),
    "clip_text_tiny": _adapted(adapters.CLIPTextEncoder,
                               functools.partial(clip.CLIPTextTiny, projection_dim=32)),
    "bert_base": _adapted(adapters.BertTextEncoder, bert.BertBase),
    "bert_tiny": _adapted(adapters.BertTextEncoder, bert.BertTiny),
}


def _lstm(model_config, vocab_size, dtype, frozen):
  del dtype
  if frozen:
    raise ValueError("model.frozen_text_encoder is only for pretrained text encoders")
  return text_lstm.LSTMTextEncoder(vocab_size=vocab_size, word_dim=model_config.word_dim,
                                   hidden_dim=model_config.text_hidden_dim,
                                   out_dim=model_config.embed_dim)


def _pretrained_text(name, model_config, vocab_size, dtype, frozen):
  del model_config
  module = PRETRAINED_TEXT_ENCODERS[name](dtype=dtype, frozen=frozen)
  if vocab_size > module.encoder.vocab_size:
    raise ValueError(f"model.text_encoder={name!r} has {module.encoder.vocab_size} token ids but "
                     f"the tokenizer has {vocab_size}; set data.tokenizer to this model's "
                     f"tokenizer directory (data.tokenizer='vocab' is for the LSTM)")
  return module


# name -> factory(model_config, vocab_size, dtype, frozen) -> module returning the text dict.
TEXT_ENCODERS: dict[str, Callable] = {
    "lstm": _lstm,
    **{name: functools.partial(_pretrained_text, name) for name in PRETRAINED_TEXT_ENCODERS},
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _pick(table, kind, name):
  if name not in table:
    raise ValueError(f"unknown {kind} {name!r}; valid {kind}s: {sorted(table)}")
  return table[name]


def resolve_conv_impl(model_config, image_size: Optional[int]) -> str:
  """model.conv_impl with 'auto' decided for images of image_size x image_size (None = small)."""
  pixels = None if image_size is None else image_size * image_size
  return conv_lib.resolve_conv_impl(model_config.get("conv_impl", "auto"), pixels)


def build_image_encoder(model_config, image_size: Optional[int] = None):
  """The image tower (an adapter); `image_size` (data.image_size) decides conv_impl='auto'."""
  dtype = _pick(DTYPES, "dtype", model_config.dtype)
  name = model_config.image_encoder
  _pick(IMAGE_ENCODERS, "image encoder", name)
  frozen = model_config.get("frozen_image_encoder", False)
  if name in CLIP_IMAGE_ENCODERS:
    return CLIP_IMAGE_ENCODERS[name](dtype=dtype, frozen=frozen)
  encoder = RESNETS[name](dtype=dtype, conv_impl=resolve_conv_impl(model_config, image_size),
                         zero_init_residual=True)
  return adapters.HFResNetImageEncoder(encoder=encoder, frozen=frozen)


def check_tokenizer(model_config, tokenizer: str):
  """A full-size pretrained text tower must read its own tokenizer's ids (data.tokenizer)."""
  name = model_config.text_encoder
  if name in PRETRAINED_TEXT_ENCODERS and not name.endswith("_tiny") and tokenizer == "vocab":
    raise ValueError(f"model.text_encoder={name!r} reads the ids of its checkpoint's tokenizer: "
                     f"set data.tokenizer to the checkpoint directory (e.g. the init_from "
                     f"directory), not 'vocab'")


def build_text_encoder(model_config, vocab_size: int):
  dtype = _pick(DTYPES, "dtype", model_config.dtype)
  factory = _pick(TEXT_ENCODERS, "text encoder", model_config.text_encoder)
  return factory(model_config, vocab_size, dtype, model_config.get("frozen_text_encoder", False))


def build_model(model_config, vocab_size: int,
                image_size: Optional[int] = None) -> retrieval_model.RetrievalModel:
  """Returns the RetrievalModel of `model_config` for a tokenizer of `vocab_size` ids.

  `image_size` (config.data.image_size) decides model.conv_impl='auto'; None
  treats images as small (the matmul lowering on CPU).
  """
  if model_config.composer not in composers.COMPOSERS:
    composers.get_composer(model_config.composer)  # raises with the list of valid names
  composer_cls = composers.COMPOSERS[model_config.composer]
  kwargs = dict(model_config.get("composer_kwargs", {}))
  field_names = {f.name for f in dataclasses.fields(composer_cls)}
  if "embed_dim" in field_names:
    kwargs.setdefault("embed_dim", model_config.embed_dim)
  if "conv_impl" in field_names:
    kwargs.setdefault("conv_impl", resolve_conv_impl(model_config, image_size))
  unknown = set(kwargs) - field_names
  if unknown:
    raise ValueError(f"composer {model_config.composer!r} has no options {sorted(unknown)}; "
                     f"it takes {sorted(field_names - {'parent', 'name'})}")
  return retrieval_model.RetrievalModel(
      image_encoder=build_image_encoder(model_config, image_size),
      text_encoder=build_text_encoder(model_config, vocab_size),
      composer=composers.get_composer(model_config.composer, **kwargs),
      embed_dim=model_config.embed_dim,
      query_image_encoder=(build_image_encoder(model_config, image_size)
                           if model_config.separate_query_encoder else None),
      init_scale=model_config.init_scale,
      learn_scale=model_config.get("learn_scale", True),
  )
