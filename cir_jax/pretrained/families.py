"""Checkpoint families: which config.json model types map onto which of our modules, and how
each checkpoint tensor name maps onto the module's parameter path."""
import dataclasses
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cir_jax.models import bert
from cir_jax.models import clip
from cir_jax.models import clip_resnet
from cir_jax.models import hf_resnet

def _strip(key: str, prefix: str) -> str:
  return key[len(prefix):] if key.startswith(prefix) else key


def _is_buffer(key: str) -> bool:
  # Non-learned index buffers some older checkpoints saved.
  return key.endswith(("position_ids", "embeddings.token_type_ids"))


def _clip_sub_config(config: dict, tower: str) -> dict:
  if config.get("model_type") == "clip":
    sub = dict(config.get(f"{tower}_config") or {})
    sub["projection_dim"] = config.get("projection_dim", 512)
    return sub
  return config


def _clip_vision_kwargs(config: dict, keys: Sequence[str]) -> dict:
  c = _clip_sub_config(config, "vision")
  has_projection = "visual_projection.weight" in keys
  return dict(image_size=c.get("image_size", 224), patch_size=c.get("patch_size", 32),
              hidden_size=c.get("hidden_size", 768), num_layers=c.get("num_hidden_layers", 12),
              num_heads=c.get("num_attention_heads", 12),
              intermediate_size=c.get("intermediate_size", 3072),
              projection_dim=c.get("projection_dim", 512) if has_projection else None,
              hidden_act=c.get("hidden_act", "quick_gelu"),
              layer_norm_eps=c.get("layer_norm_eps", 1e-5))


def _single_eos(eos) -> int:
  if isinstance(eos, (list, tuple)):
    if len(eos) != 1:
      raise ValueError(f"CLIP text config has several eos_token_id {eos}; transformers' pooling "
                       f"(first position equal to eos_token_id) needs one")
    eos = eos[0]
  return int(eos)


def _clip_text_kwargs(config: dict, keys: Sequence[str]) -> dict:
  c = _clip_sub_config(config, "text")
  has_projection = "text_projection.weight" in keys
  return dict(vocab_size=c.get("vocab_size", 49408),
              max_position_embeddings=c.get("max_position_embeddings", 77),
              hidden_size=c.get("hidden_size", 512), num_layers=c.get("num_hidden_layers", 12),
              num_heads=c.get("num_attention_heads", 8),
              intermediate_size=c.get("intermediate_size", 2048),
              projection_dim=c.get("projection_dim", 512) if has_projection else None,
              # 49407 is CLIPTextConfig's default when config.json omits it.
              eos_token_id=_single_eos(c.get("eos_token_id", 49407)),
              hidden_act=c.get("hidden_act", "quick_gelu"),
              layer_norm_eps=c.get("layer_norm_eps", 1e-5))


def _bert_kwargs(config: dict, keys: Sequence[str]) -> dict:
  kind = config.get("position_embedding_type", "absolute")
  if kind != "absolute":
    raise ValueError(f"BERT position_embedding_type {kind!r} is not supported (only 'absolute')")
  if config.get("is_decoder", False):
    raise ValueError("BERT config has is_decoder=True; only the bidirectional encoder is built")
  return dict(vocab_size=config.get("vocab_size", 30522),
              max_position_embeddings=config.get("max_position_embeddings", 512),
              type_vocab_size=config.get("type_vocab_size", 2),
              hidden_size=config.get("hidden_size", 768),
              num_layers=config.get("num_hidden_layers", 12),
              num_heads=config.get("num_attention_heads", 12),
              intermediate_size=config.get("intermediate_size", 3072),
              hidden_act=config.get("hidden_act", "gelu"),
              layer_norm_eps=config.get("layer_norm_eps", 1e-12),
              hidden_dropout_prob=config.get("hidden_dropout_prob", 0.1),
              attention_dropout_prob=config.get("attention_probs_dropout_prob", 0.1),
              add_pooling_layer=any(_strip(k, "bert.").startswith("pooler.") for k in keys))


def _resnet_kwargs(config: dict, keys: Sequence[str]) -> dict:
  del keys
  if config.get("hidden_act", "relu") != "relu":
    raise ValueError(f"ResNet hidden_act {config['hidden_act']!r} is not supported (only relu)")
  return dict(depths=tuple(config.get("depths", (3, 4, 6, 3))),
              hidden_sizes=tuple(config.get("hidden_sizes", (256, 512, 1024, 2048))),
              embedding_size=config.get("embedding_size", 64),
              layer_type=config.get("layer_type", "bottleneck"),
              downsample_in_first_stage=config.get("downsample_in_first_stage", False),
              downsample_in_bottleneck=config.get("downsample_in_bottleneck", False))


def _rename_clip(tower: str, other: str, projection: str, other_projection: str):
  def rename(key: str) -> Optional[str]:
    if (key.startswith((f"{other}_model.", f"{other_projection}.")) or key == "logit_scale"
        or _is_buffer(key)):
      return None  # the other tower / the contrastive temperature: not part of this module
    return _strip(key, f"{tower}_model.")
  return rename


def _rename_bert(key: str) -> Optional[str]:
  key = _strip(key, "bert.")
  if key.startswith("cls.") or _is_buffer(key):
    return None  # pre-training heads of BertForPreTraining / BertForMaskedLM
  return key


def _rename_resnet(key: str) -> Optional[str]:
  if key.startswith("classifier."):
    return None  # ImageNet head of ResNetForImageClassification
  return _strip(key, "resnet.")


def _text_dummy(module):
  length = min(8, module.max_position_embeddings)
  return (jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), jnp.int32))


@dataclasses.dataclass(frozen=True)
class Family:
  """How one checkpoint family maps onto one of our modules.

  Attributes:
    module_cls: the Flax module class.
    model_types: `config.json` model_type values this family accepts.
    module_kwargs: (config.json, checkpoint tensor names) -> module_cls kwargs.
    rename: checkpoint name -> dotted name relative to the module, or None to
      skip a tensor that belongs to another part of the checkpoint.
    dummy_inputs: module -> positional inputs for `init` (shapes only).
  """
  module_cls: type
  model_types: tuple[str, ...]
  module_kwargs: Callable[[dict, Sequence[str]], dict]
  rename: Callable[[str], Optional[str]]
  dummy_inputs: Callable[[nn.Module], tuple]


FAMILIES: dict[str, Family] = {
    "clip_vision": Family(
        clip.CLIPVisionEncoder, ("clip", "clip_vision_model"), _clip_vision_kwargs,
        _rename_clip("vision", "text", "visual_projection", "text_projection"),
        lambda m: (jnp.zeros((1, m.image_size, m.image_size, 3), jnp.float32),)),
    "clip_text": Family(
        clip.CLIPTextEncoder, ("clip", "clip_text_model"), _clip_text_kwargs,
        _rename_clip("text", "vision", "text_projection", "visual_projection"), _text_dummy),
    "bert": Family(bert.BertEncoder, ("bert",), _bert_kwargs, _rename_bert, _text_dummy),
    "resnet": Family(hf_resnet.HFResNet, ("resnet",), _resnet_kwargs, _rename_resnet,
                     lambda m: (jnp.zeros((1, 64, 64, 3), jnp.float32),)),
}


def get_family(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f"unknown checkpoint family {name!r}; valid: {sorted(FAMILIES)}")
  return FAMILIES[name]


# CLIP's modified-ResNet image tower (RN50, RN50x4, ...) from an open_clip state dict
# (`visual.layer1.0.conv1.weight`, `visual.attnpool.q_proj.weight`, ...); a directory
# with config.json {'model_type': 'open_clip_resnet', **open_clip model_cfg} and
# model.safetensors, see clip_resnet.prepare_open_clip_directory. The text tower's keys
# (open_clip's `transformer.resblocks.*`) are skipped here.
FAMILIES["clip_resnet"] = Family(
    clip_resnet.ModifiedResNet, (clip_resnet.MODEL_TYPE,), clip_resnet.module_kwargs,
    clip_resnet.rename_open_clip,
    lambda m: (jnp.zeros((1, m.image_size, m.image_size, 3), jnp.float32),))
