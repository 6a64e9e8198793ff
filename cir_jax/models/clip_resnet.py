"""CLIP's modified ResNet image tower (Flax Linen, NHWC), in open_clip's checkpoint layout.

The image encoders of OpenAI's RN50 / RN101 / RN50x4 CLIP models (Radford et al.
2021, Sec. 2.4; open_clip `modified_resnet.py`) differ from a torchvision ResNet:

* stem: three 3x3 convolutions (the first with stride 2; widths width/2, width/2,
  width), each with BatchNorm + ReLU, then a 2x2 AVERAGE pool (not a max pool);
* bottleneck blocks (expansion 4) with every convolution at stride 1: a block
  that downsamples average-pools (kernel = stride) after its 3x3 convolution,
  and its shortcut average-pools before the 1x1 projection + BatchNorm;
* attention pooling instead of global average pooling: the h*w cells of the last
  map, preceded by their mean, plus a learned positional embedding
  [h*w + 1, C], go through one multi-head attention (separate q/k/v projections
  with bias, softmax(q k^T / sqrt(head_dim)) v, then `c_proj`); the output at
  the mean token is the image embedding [B, output_dim] in CLIP's joint space.

Submodules carry open_clip's attribute names, so the checkpoint tensor
`visual.layer3.2.downsample.0.weight` lives at `layer3_2/downsample_0/kernel`
(OIHW -> HWIO) and `visual.attnpool.q_proj.weight` at `attnpool/q_proj/kernel`
(transposed); `cir_jax.pretrained` (family 'clip_resnet') does the mapping.
The positional embedding fixes the input side: image_size px, with
image_size / 32 cells per side.
"""
import functools
import json
import os
import shutil
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cir_jax.models import batch_norm
from cir_jax.models import clip
from cir_jax.models import conv as conv_lib

EXPANSION = 4  # bottleneck output channels = 4 x planes


def _conv_bn(x, features, kernel, conv_name, bn_name, train, dtype, conv_impl, stride=1,
             activation=True):
  """conv `conv_name` (no bias, padding k // 2) -> BatchNorm `bn_name` -> optional ReLU.

  Called inside an `nn.compact` method, so both submodules are named in the caller's
  scope exactly as open_clip names them (e.g. 'conv2' / 'bn2', 'downsample_0' / 'downsample_1').
  """
  pad = kernel // 2
  x = conv_lib.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                    use_bias=False, dtype=dtype, param_dtype=jnp.float32, conv_impl=conv_impl,
                    name=conv_name)(x)
  # torch momentum 0.1 == flax momentum 0.9; eps as torch's BatchNorm2d.
  x = batch_norm.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                           dtype=dtype, param_dtype=jnp.float32, name=bn_name)(x)
  return nn.relu(x) if activation else x


def avg_pool(x, k: int):
  """torch's AvgPool2d(k): window k, stride k, no padding, floor. [B, H, W, C] -> [B, H/k, W/k, C]."""
  return x if k == 1 else nn.avg_pool(x, (k, k), strides=(k, k), padding="VALID")


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> avg-pool(stride) -> 1x1 (x4), shortcut avg-pool -> 1x1 -> BN, ReLU."""
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    """[B, H, W, C] -> [B, H / stride, W / stride, 4 * planes]."""
    conv_bn = functools.partial(_conv_bn, train=train, dtype=self.dtype, conv_impl=self.conv_impl)
    out = conv_bn(x, self.planes, 1, "conv1", "bn1")
    out = conv_bn(out, self.planes, 3, "conv2", "bn2")
    out = avg_pool(out, self.stride)
    out = conv_bn(out, self.planes * EXPANSION, 1, "conv3", "bn3", activation=False)
    identity = x
    if self.stride > 1 or x.shape[-1] != self.planes * EXPANSION:
      # open_clip's Sequential("-1": AvgPool2d, "0": conv, "1": BatchNorm).
      identity = conv_bn(avg_pool(x, self.stride), self.planes * EXPANSION, 1, "downsample_0",
                         "downsample_1", activation=False)
    return nn.relu(out + identity)


class AttentionPool2d(nn.Module):
  """Multi-head QKV attention pooling over [mean token; h*w cells] + positions."""
  spacial_dim: int
  num_heads: int
  output_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """[B, h, w, C] (h = w = spacial_dim) -> [B, output_dim] (the mean token's output)."""
    b, h, w, c = x.shape
    if (h, w) != (self.spacial_dim, self.spacial_dim):
      raise ValueError(f"attention pooling got a {h}x{w} map; its positional embedding is for "
                       f"{self.spacial_dim}x{self.spacial_dim} (image_size = 32 x that)")
    if c % self.num_heads:
      raise ValueError(f"attention pooling width {c} is not divisible by num_heads "
                       f"{self.num_heads}")
    tokens = x.reshape(b, h * w, c)  # row-major, as torch's NCHW flatten(2) + permute
    tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
    positions = self.param("positional_embedding", nn.initializers.normal(c**-0.5),
                           (h * w + 1, c), jnp.float32)
    tokens = tokens + positions.astype(tokens.dtype)[None]
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32,
                              kernel_init=nn.initializers.normal(c**-0.5))
    split = lambda t: t.reshape(t.shape[:2] + (self.num_heads, c // self.num_heads))
    # Only the mean token's output is used: query with it alone (the same value as
    # open_clip, which attends from every token and keeps row 0).
    q = split(dense(c, name="q_proj")(tokens[:, :1]))
    k = split(dense(c, name="k_proj")(tokens))
    v = split(dense(c, name="v_proj")(tokens))
    out = clip.attend(q, k, v, None, self.dtype).reshape(b, c)
    return dense(self.output_dim, name="c_proj")(out)


class ModifiedResNet(nn.Module):
  """CLIP's modified-ResNet image tower with open_clip's parameter names.

  Attributes:
    layers: bottleneck blocks per stage, e.g. (3, 4, 6, 3) for RN50.
    width: stem width; stage i has 4 * width * 2^i output channels, the last
      (the attention-pooling width) 32 * width.
    output_dim: CLIP joint-space width (`c_proj`'s output), e.g. 1024 for RN50.
    heads: attention-pooling heads (open_clip: 32 * width / 64).
    image_size: input side in pixels (square, a multiple of 32).
    dtype: compute dtype; parameters and batch statistics stay float32.
    conv_impl: convolution lowering, see `cir_jax.models.conv`.
  """
  layers: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  output_dim: int = 1024
  heads: int = 32
  image_size: int = 224
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, images, train: bool = False,
               modulate: Optional[Callable[[int, jnp.ndarray], jnp.ndarray]] = None):
    """Encodes images.

    Args:
      images: float [B, image_size, image_size, 3] (NHWC), CLIP-normalised.
      train: BatchNorm uses batch statistics and updates `batch_stats` if True
        (apply with mutable=['batch_stats']); otherwise the running averages.
      modulate: optional `f(stage_index, feature_map) -> feature_map` applied after
        every stage (the hook FiLM-style composers use).

    Returns:
      (embedding [B, output_dim] float32, aux) with aux 'embedding' (the same),
      'pooled' [B, 32 * width] (mean of the last map) and 'feature_map'
      [B, image_size / 32, image_size / 32, 32 * width] float32.
    """
    if len(self.layers) != 4:
      raise ValueError(f"ModifiedResNet needs 4 stages, got layers={tuple(self.layers)}")
    if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
      raise ValueError(f"CLIP ResNet input is {images.shape[1]}x{images.shape[2]} px; this model "
                       f"takes {self.image_size}x{self.image_size} (NHWC images expected)")
    conv_bn = functools.partial(_conv_bn, train=train, dtype=self.dtype, conv_impl=self.conv_impl)
    x = images.astype(self.dtype)
    x = conv_bn(x, self.width // 2, 3, "conv1", "bn1", stride=2)
    x = conv_bn(x, self.width // 2, 3, "conv2", "bn2")
    x = conv_bn(x, self.width, 3, "conv3", "bn3")
    x = avg_pool(x, 2)
    for stage, depth in enumerate(self.layers):
      for j in range(depth):
        stride = 2 if stage > 0 and j == 0 else 1
        x = Bottleneck(self.width * 2**stage, stride, dtype=self.dtype, conv_impl=self.conv_impl,
                       name=f"layer{stage + 1}_{j}")(x, train)
      if modulate is not None:
        x = modulate(stage, x)
    embedding = AttentionPool2d(self.image_size // 32, self.heads, self.output_dim,
                                dtype=self.dtype, name="attnpool")(x).astype(jnp.float32)
    feature_map = x.astype(jnp.float32)
    aux = {"embedding": embedding, "pooled": feature_map.mean(axis=(1, 2)),
           "feature_map": feature_map}
    return embedding, aux


# open_clip's model configs (RN50.json, RN101.json, RN50x4.json); heads = 32 * width / 64.
RN50 = functools.partial(ModifiedResNet, layers=(3, 4, 6, 3), width=64, output_dim=1024,
                         heads=32, image_size=224)
RN101 = functools.partial(ModifiedResNet, layers=(3, 4, 23, 3), width=64, output_dim=512,
                          heads=32, image_size=224)
RN50x4 = functools.partial(ModifiedResNet, layers=(4, 6, 10, 6), width=80, output_dim=640,
                           heads=40, image_size=288)
# Tiny variant for tests (32 px, width 8: a 1x1 map of 256 channels, projection 24).
RNTiny = functools.partial(ModifiedResNet, layers=(1, 1, 1, 1), width=8, output_dim=24, heads=4,
                           image_size=32)

PRESETS = {"clip_rn50": RN50, "clip_rn101": RN101, "clip_rn50x4": RN50x4, "clip_rn_tiny": RNTiny}


# ------------------------------------------------------- open_clip checkpoints

MODEL_TYPE = "open_clip_resnet"   # config.json model_type read by family 'clip_resnet'
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
VISUAL_PREFIX = "visual."


def rename_open_clip(key: str) -> Optional[str]:
  """open_clip state-dict name -> name relative to `ModifiedResNet`; None = not this tower.

  `visual.layer1.0.conv1.weight` -> `layer1.0.conv1.weight` (cir_jax.pretrained then
  makes it `layer1_0/conv1/kernel`); the text tower, `logit_scale` and the like are skipped.
  """
  if not key.startswith(VISUAL_PREFIX):
    return None
  return key[len(VISUAL_PREFIX):]


def module_kwargs(config: dict, keys: Sequence[str]) -> dict:
  """`ModifiedResNet` kwargs from open_clip's model config (`model_cfg` of open_clip_config.json,
  optionally wrapped as {'model_cfg': ...}): embed_dim and vision_cfg's layers/width/image_size/
  head_width (heads = 32 * width / head_width, open_clip's rule)."""
  del keys
  cfg = config.get("model_cfg", config)
  vision = cfg.get("vision_cfg")
  if not isinstance(vision, dict) or not isinstance(vision.get("layers"), (list, tuple)):
    raise ValueError(f"open_clip config has no vision_cfg.layers list (a modified ResNet has 4 "
                     f"stage depths); got vision_cfg={vision!r}")
  width = int(vision.get("width", 64))
  head_width = int(vision.get("head_width", 64))
  image_size = vision.get("image_size", 224)
  if isinstance(image_size, (list, tuple)):
    if len(set(image_size)) != 1:
      raise ValueError(f"open_clip vision_cfg.image_size {image_size} is not square")
    image_size = image_size[0]
  return dict(layers=tuple(int(n) for n in vision["layers"]), width=width,
              output_dim=int(cfg.get("embed_dim", 1024)), heads=width * 32 // head_width,
              image_size=int(image_size))


def prepare_open_clip_directory(source: str, destination: str) -> str:
  """Makes an open_clip download readable by `cir_jax.pretrained` (family 'clip_resnet').

  open_clip (and timm's `*_clip.openai` hub repos) store `open_clip_config.json` and
  `open_clip_model.safetensors`; the loader reads `config.json` + `model.safetensors`.
  This writes `destination/config.json` = {'model_type': 'open_clip_resnet', **model_cfg}
  and links (or copies) the weights, unchanged, as `destination/model.safetensors`.
  Only safetensors are accepted (never a pickled .bin).

  Returns:
    destination.
  """
  config_path = os.path.join(source, OPEN_CLIP_CONFIG)
  weights_path = os.path.join(source, OPEN_CLIP_WEIGHTS)
  for path in (config_path, weights_path):
    if not os.path.isfile(path):
      listing = sorted(os.listdir(source)) if os.path.isdir(source) else "<no such directory>"
      raise FileNotFoundError(f"open_clip directory {source!r} has no {os.path.basename(path)} "
                              f"(found: {listing})")
  with open(config_path) as f:
    config = json.load(f)
  model_cfg = dict(config.get("model_cfg", config))
  module_kwargs(model_cfg, ())  # validates: a modified-ResNet vision_cfg
  os.makedirs(destination, exist_ok=True)
  with open(os.path.join(destination, "config.json"), "w") as f:
    json.dump({"model_type": MODEL_TYPE, **model_cfg}, f, indent=1)
  target = os.path.join(destination, "model.safetensors")
  if os.path.lexists(target):
    os.remove(target)
  try:
    os.symlink(os.path.abspath(weights_path), target)
  except OSError:
    shutil.copyfile(weights_path, target)
  return destination


# The text tower of an open_clip checkpoint is CLIP's transformer under other names.
# `_OPEN_CLIP_TEXT` maps them onto transformers' CLIPTextModelWithProjection names, which
# `cir_jax.pretrained` (family 'clip_text') reads; {i} is the block index.
_OPEN_CLIP_TEXT = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPEN_CLIP_BLOCK = {
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}


def open_clip_text_state(state, num_layers: int) -> dict:
  """open_clip text tensors -> transformers CLIPTextModelWithProjection tensors (numpy).

  Splits each block's packed `attn.in_proj_weight` [3w, w] / `in_proj_bias` [3w] into
  q/k/v (in that order, as torch's MultiheadAttention packs them) and transposes the bare
  `text_projection` [w, d] (used as x @ P) into a Linear weight [d, w]. Raises a
  ValueError naming the first open_clip text tensor it cannot place.
  """
  missing = sorted(k for k in list(_OPEN_CLIP_TEXT) + ["text_projection"] if k not in state)
  if missing:
    raise ValueError(f"open_clip state has no text tower tensors {missing}")
  out = {}
  for key, target in _OPEN_CLIP_TEXT.items():
    out[target] = state[key]
  out["text_projection.weight"] = np_transpose(state["text_projection"])
  for i in range(num_layers):
    src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
    for name, target in _OPEN_CLIP_BLOCK.items():
      for leaf in ("weight", "bias"):
        out[f"{dst}{target}.{leaf}"] = state[f"{src}{name}.{leaf}"]
    for leaf in ("weight", "bias"):
      packed = state[f"{src}attn.in_proj_{leaf}"]
      for part, chunk in zip("qkv", np_split3(packed)):
        out[f"{dst}self_attn.{part}_proj.{leaf}"] = chunk
  used = set(_OPEN_CLIP_TEXT) | {"text_projection"} | {
      f"transformer.resblocks.{i}.{name}.{leaf}" for i in range(num_layers)
      for name in _OPEN_CLIP_BLOCK for leaf in ("weight", "bias")} | {
      f"transformer.resblocks.{i}.attn.in_proj_{leaf}" for i in range(num_layers)
      for leaf in ("weight", "bias")}
  left = sorted(k for k in state if not k.startswith(VISUAL_PREFIX) and k not in used
                and k not in ("logit_scale", "attn_mask"))
  if left:
    raise ValueError(f"open_clip text tensors with no place in a {num_layers}-layer CLIP text "
                     f"tower: {left[:5]}" + (f" (+{len(left) - 5} more)" if len(left) > 5 else ""))
  return out


def np_transpose(x):
  return x.T.copy()


def np_split3(x):
  if x.shape[0] % 3:
    raise ValueError(f"packed in_proj has {x.shape[0]} rows, not a multiple of 3")
  n = x.shape[0] // 3
  return x[:n], x[n:2 * n], x[2 * n:]


def prepare_open_clip_text_directory(source: str, destination: str) -> str:
  """Writes the text tower of an open_clip download as a transformers-layout
  CLIPTextModelWithProjection directory (config.json + model.safetensors) for family
  'clip_text' (e.g. `config.init_from_text`). Pooling is at the highest token id
  (open_clip's argmax = eos_token_id 2 in our CLIPTextEncoder); quick_gelu from the config.
  """
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  with open(os.path.join(source, OPEN_CLIP_CONFIG)) as f:
    config = json.load(f)
  cfg = config.get("model_cfg", config)
  text = cfg.get("text_cfg", {})
  width, layers = int(text.get("width", 512)), int(text.get("layers", 12))
  state = safetensors.numpy.load_file(os.path.join(source, OPEN_CLIP_WEIGHTS))
  hf_config = {"model_type": "clip_text_model", "vocab_size": int(text.get("vocab_size", 49408)),
               "max_position_embeddings": int(text.get("context_length", 77)),
               "hidden_size": width, "num_hidden_layers": layers,
               "num_attention_heads": int(text.get("heads", 8)),
               "intermediate_size": int(width * text.get("mlp_ratio", 4.0)),
               "projection_dim": int(cfg.get("embed_dim", 512)), "eos_token_id": 2,
               "hidden_act": "quick_gelu" if cfg.get("quick_gelu", False) else "gelu",
               "layer_norm_eps": 1e-5}
  os.makedirs(destination, exist_ok=True)
  with open(os.path.join(destination, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=1)
  safetensors.numpy.save_file(open_clip_text_state(state, layers),
                              os.path.join(destination, "model.safetensors"))
  return destination
