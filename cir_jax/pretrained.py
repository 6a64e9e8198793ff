"""Hugging Face-format checkpoints (safetensors + config.json) -> our Flax variables.

No model hub is reachable, so weights come from a LOCAL directory as written by
`save_pretrained`: `config.json` plus `model.safetensors`, or shards
`model-0000i-of-0000n.safetensors` listed in `model.safetensors.index.json`. They
are read with `safetensors.numpy` (never torch, never pickle) and mapped onto
the modules of `cir_jax.models.{clip,bert,hf_resnet}`, whose submodules carry
the PyTorch attribute names. The mapping is mechanical:

  `encoder.layers.3.mlp.fc1.weight` -> `params/encoder/layers_3/mlp/fc1/kernel`

with the leaf renamed by what the Flax module at that path holds: Linear
`weight` [out, in] -> `kernel` [in, out]; Conv `weight` OIHW -> `kernel` HWIO;
Embedding `weight` -> `embedding`; LayerNorm/BatchNorm `weight` (or `gamma`)
-> `scale`, `bias` (or `beta`) -> `bias`; BatchNorm `running_mean/var` ->
`batch_stats/.../mean|var`. Known heads of HF task models (`cls.*`,
`classifier.*`), the other CLIP tower and persistent id buffers are skipped;
anything else that does not fit is an error. Loading is STRICT: the converted
tree must equal the module's (from `jax.eval_shape` of its init) key for key and
shape for shape, or a ValueError names the directory and the first missing keys,
unexpected keys and shape mismatches.

Families (`FAMILIES`): 'clip_vision', 'clip_text' (from a CLIPModel,
CLIP{Vision,Text}Model or *WithProjection checkpoint), 'bert' (BertModel or
BertFor* checkpoints) and 'resnet' (ResNetModel / ResNetForImageClassification).

Typical use:

  module, variables = pretrained.load_pretrained('/ckpt/clip-vit-base-patch32', 'clip_vision')
  params = pretrained.merge_params(params, variables['params'], 'image_encoder')
"""
import dataclasses
import json
import os
import struct
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
import safetensors.numpy

from cir_jax.models import bert
from cir_jax.models import clip
from cir_jax.models import clip_resnet
from cir_jax.models import hf_resnet

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
_MAX_LISTED = 5  # keys named per category in an error message

# ------------------------------------------------------------------ reading files


def read_config(directory: str) -> dict:
  """Returns the parsed `config.json` of a checkpoint directory."""
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint directory {directory!r} "
                            f"(found: {_listing(directory)})")
  with open(path) as f:
    return json.load(f)


def weight_files(directory: str) -> list[str]:
  """Paths of the safetensors files of a checkpoint (one file, or the shards of the index)."""
  single = os.path.join(directory, WEIGHTS_NAME)
  if os.path.isfile(single):
    return [single]
  index = os.path.join(directory, INDEX_NAME)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not weight_map:
      raise ValueError(f"{index} has no 'weight_map'")
    files = sorted(set(weight_map.values()))
    absent = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
    if absent:
      raise FileNotFoundError(f"{index} lists shards missing from {directory!r}: {absent}")
    return [os.path.join(directory, name) for name in files]
  raise FileNotFoundError(
      f"no weights in checkpoint directory {directory!r}: looked for {WEIGHTS_NAME} and "
      f"{INDEX_NAME} (found: {_listing(directory)}). Only safetensors are read; convert "
      f"pytorch_model.bin with `save_pretrained(..., safe_serialization=True)` elsewhere.")


def _listing(directory: str) -> list[str]:
  if not os.path.isdir(directory):
    return ["<directory does not exist>"]
  return sorted(os.listdir(directory))[:20]


def _read_raw(path: str) -> dict[str, np.ndarray]:
  """Reads a safetensors file by its documented layout (used for BF16, which numpy lacks).

  Layout: u64 little-endian header size, a JSON header {name: {dtype, shape,
  data_offsets}}, then the raw little-endian bytes.
  """
  dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
            "F64": np.float64, "I64": np.int64, "I32": np.int32, "I16": np.int16,
            "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    out[name] = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
  return out


def read_state(directory: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory by their PyTorch names."""
  state = {}
  for path in weight_files(directory):
    try:
      state.update(safetensors.numpy.load_file(path))
    except TypeError:  # "data type 'bfloat16' not understood"
      state.update(_read_raw(path))
  return state


def tensor_shapes(directory: str) -> dict[str, tuple[int, ...]]:
  """Names and shapes of a checkpoint's tensors, from the headers only (cheap)."""
  shapes = {}
  for path in weight_files(directory):
    with safe_open(path, framework="numpy") as f:
      for key in f.keys():
        shapes[key] = tuple(f.get_slice(key).get_shape())
  return shapes


# ------------------------------------------------------------- model families


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


def _family(name: str) -> Family:
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


# ------------------------------------------------------------------ conversion

Path = tuple[str, ...]


def _split(dotted: str) -> Path:
  """'encoder.layers.0.mlp.fc1.weight' -> ('encoder', 'layers_0', 'mlp', 'fc1', 'weight')."""
  out = []
  for part in dotted.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"  # list index -> Flax's `name_{i}` submodule
    else:
      out.append(part)
  return tuple(out)


def _to_flax(dotted: str, value: np.ndarray, expected: Mapping[Path, Any]):
  """Maps one PyTorch tensor to (variables path, array); path None = drop it."""
  *module, leaf = _split(dotted)
  params = ("params", *module)
  if leaf in ("weight", "gamma"):
    if params + ("kernel",) in expected:
      if value.ndim == 2:
        return params + ("kernel",), value.T  # Linear [out, in] -> [in, out]
      if value.ndim == 4:
        return params + ("kernel",), value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      return params + ("kernel",), value
    if params + ("embedding",) in expected:
      return params + ("embedding",), value
    if params + ("scale",) in expected:
      return params + ("scale",), value
    return params + (leaf,), value  # not in the model: reported as unexpected
  if leaf in ("bias", "beta"):
    return params + ("bias",), value
  if leaf == "running_mean":
    return ("batch_stats", *module, "mean"), value
  if leaf == "running_var":
    return ("batch_stats", *module, "var"), value
  if leaf == "num_batches_tracked":
    return None, value  # torch's BatchNorm counter; Flax uses a fixed momentum
  return params + (leaf,), value  # bare parameters: class_embedding, ...


def _flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def _unflatten(flat: Mapping[Path, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _fmt(path: Path) -> str:
  return "/".join(path)


def _mismatch_report(where: str, missing, unexpected, mismatched) -> str:
  """missing/unexpected: lists of strings; mismatched: list of strings."""
  lines = [where]
  for title, items in (("missing (in the model, not in the checkpoint)", missing),
                       ("unexpected (in the checkpoint, not in the model)", unexpected),
                       ("shape mismatches", mismatched)):
    if items:
      shown = "; ".join(items[:_MAX_LISTED])
      more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
      lines.append(f"  {len(items)} {title}, first: {shown}{more}")
  return "\n".join(lines)


def convert_state(state: Mapping[str, np.ndarray], family: str, module: nn.Module,
                  source: str = "<state dict>") -> dict:
  """Strictly maps PyTorch-named tensors onto `module`'s variables.

  Args:
    state: checkpoint tensors by PyTorch name (e.g. from `read_state`).
    family: a key of FAMILIES.
    module: the Flax module to fill (its shapes come from `jax.eval_shape`).
    source: where `state` came from, for error messages.

  Returns:
    Variables {'params': ..., ['batch_stats': ...]} of numpy arrays in the
    module's parameter dtypes.

  Raises:
    ValueError: naming the first missing, unexpected and mis-shaped tensors.
  """
  fam = _family(family)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *fam.dummy_inputs(module))
  expected = _flatten(shapes)
  loaded, origin = {}, {}
  for key in sorted(state):
    dotted = fam.rename(key)
    if dotted is None:
      continue
    path, value = _to_flax(dotted, state[key], expected)
    if path is not None:
      loaded[path], origin[path] = value, key
  missing = [f"{_fmt(p)} {tuple(expected[p].shape)}" for p in expected if p not in loaded]
  unexpected = [f"{origin[p]} {tuple(state[origin[p]].shape)} (-> {_fmt(p)})"
                for p in loaded if p not in expected]
  mismatched = [f"{origin[p]} {tuple(state[origin[p]].shape)} -> {_fmt(p)}: checkpoint gives "
                f"{tuple(loaded[p].shape)}, model expects {tuple(expected[p].shape)}"
                for p in loaded if p in expected and loaded[p].shape != expected[p].shape]
  if missing or unexpected or mismatched:
    raise ValueError(_mismatch_report(
        f"checkpoint {source} does not fit {type(module).__name__} (family {family!r}):",
        missing, unexpected, mismatched))
  return _unflatten({p: np.asarray(loaded[p], dtype=expected[p].dtype) for p in expected})


def module_from_config(directory: str, family: str, **overrides) -> nn.Module:
  """Builds the module described by a checkpoint's `config.json`.

  Args:
    directory: local checkpoint directory.
    family: a key of FAMILIES.
    **overrides: module attributes to set, e.g. dtype=jnp.bfloat16, remat=True.

  Returns:
    An unbound Flax module.
  """
  fam = _family(family)
  config = read_config(directory)
  model_type = config.get("model_type")
  if model_type not in fam.model_types:
    shapes = tensor_shapes(directory)
    first = "; ".join(f"{k} {v}" for k, v in list(sorted(shapes.items()))[:_MAX_LISTED])
    raise ValueError(f"checkpoint {directory!r} has model_type {model_type!r}, but family "
                     f"{family!r} reads {list(fam.model_types)}; its first tensors: {first}")
  kwargs = fam.module_kwargs(config, list(tensor_shapes(directory)))
  kwargs.update(overrides)
  return fam.module_cls(**kwargs)


def load_variables(directory: str, family: str, module: nn.Module) -> dict:
  """Reads a checkpoint directory into the variables of a given `module` (strict)."""
  return convert_state(read_state(directory), family, module, source=repr(directory))


def load_pretrained(directory: str, family: str, **overrides) -> tuple[nn.Module, dict]:
  """Builds the module of a checkpoint directory and loads its weights.

  Args:
    directory: local directory with config.json and safetensors weights.
    family: 'clip_vision', 'clip_text', 'bert' or 'resnet'.
    **overrides: module attributes, e.g. dtype=jnp.bfloat16, remat=True.

  Returns:
    (module, variables) where variables holds numpy 'params' (and 'batch_stats'
    for ResNet).
  """
  module = module_from_config(directory, family, **overrides)
  return module, load_variables(directory, family, module)


# ------------------------------------------------------------------- merging


def _as_path(path: Union[str, Sequence[str]]) -> Path:
  if isinstance(path, str):
    return tuple(p for p in path.split("/") if p)
  return tuple(path)


def merge_params(params: Mapping, loaded: Mapping, path: Union[str, Sequence[str]] = ()) -> dict:
  """Returns `params` with the sub-tree at `path` replaced by `loaded` (strict).

  The rest of `params` (freshly initialised heads, the other tower, ...) is kept.
  The loaded part must match the sub-tree it replaces key for key and shape for
  shape; values are cast to the dtypes of the replaced leaves.

  Args:
    params: a (larger) model's tree, e.g. `variables['params']`.
    loaded: the tree to insert, e.g. `load_pretrained(...)[1]['params']`.
    path: '/'-joined (or tuple) path of the sub-tree in `params`; '' = the root.

  Returns:
    A new tree; `params` is not modified.

  Raises:
    ValueError: if `path` does not exist or the trees differ (first keys named).
  """
  path = _as_path(path)
  node = params
  for depth, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
      raise ValueError(f"merge_params: no {key!r} at {_fmt(path[:depth]) or '<root>'}; "
                       f"it holds {have}")
    node = node[key]
  target, source = _flatten(node), _flatten(loaded)
  shape = lambda x: tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
  missing = [f"{_fmt(p)} {shape(target[p])}" for p in target if p not in source]
  unexpected = [f"{_fmt(p)} {shape(source[p])}" for p in source if p not in target]
  mismatched = [f"{_fmt(p)}: loaded {shape(source[p])}, model {shape(target[p])}"
                for p in source if p in target and shape(source[p]) != shape(target[p])]
  if missing or unexpected or mismatched:
    raise ValueError(_mismatch_report(
        f"merge_params: loaded tree does not fit {_fmt(path) or '<root>'}:",
        missing, unexpected, mismatched))
  merged = _unflatten({p: np.asarray(source[p], dtype=target[p].dtype) for p in target})
  return _replace(params, path, merged)


def _replace(tree: Mapping, path: Path, value) -> Any:
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _replace(tree[path[0]], path[1:], value)
  return out


def merge_variables(variables: Mapping, loaded: Mapping,
                    path: Union[str, Sequence[str]] = ()) -> dict:
  """`merge_params` for every collection of `loaded` ('params', 'batch_stats')."""
  out = dict(variables)
  for collection, tree in loaded.items():
    if collection not in variables:
      raise ValueError(f"merge_variables: the model has no {collection!r} collection; it has "
                       f"{sorted(variables)}")
    out[collection] = merge_params(variables[collection], tree, path)
  return out
