"""CLIP vision and text transformers (Flax Linen), numerically matching transformers' CLIP.

Both towers follow `transformers.models.clip.modeling_clip` (v5) layer for layer and
name their submodules after the PyTorch attributes, so a checkpoint tensor
`vision_model.encoder.layers.3.mlp.fc1.weight` lives at
`encoder/layers_3/mlp/fc1/kernel` (transposed) of `CLIPVisionEncoder`; see
`cir_jax.pretrained` for the mapping. Conventions:

* images are float32 NHWC [B, H, W, C], already normalised with CLIP's mean/std;
* texts are int32 ids [B, L] plus an attention mask [B, L] (1 = real token);
* each encoder returns `(embedding, aux)` where `embedding` is the projected
  feature (or the pooled one when the tower has no projection) in float32.

Definitions (identical to transformers):
* vision `last_hidden_state` [B, 1 + N, H] is the encoder output BEFORE
  `post_layernorm` (CLS token first, then the N patch tokens row-major);
  `pooled` [B, H] is `post_layernorm(last_hidden_state[:, 0])`.
* text `last_hidden_state` [B, L, H] is AFTER `final_layer_norm`; `pooled` [B, H]
  is its row at the EOS token (see `eos_positions`).
"""
import functools
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

# LayerNorm with two-pass variance as torch computes it: CLIP has large outlier
# activations for which E[x^2] - E[x]^2 loses precision.
LayerNorm = functools.partial(nn.LayerNorm, use_fast_variance=False)

ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Returns the activation called `name` in a transformers config (`hidden_act`)."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def attend(q, k, v, mask: Optional[jnp.ndarray], dtype) -> jnp.ndarray:
  """Scaled dot-product attention over heads.

  Args:
    q, k, v: [B, L, heads, head_dim] (keys/values may have their own length S).
    mask: bool, broadcastable to [B, heads, L, S]; True = may attend. None = all.
    dtype: compute dtype of the two matmuls.

  Returns:
    [B, L, heads, head_dim] in `dtype`.
  """
  # Scale after the matmul, in float32, in the order transformers uses; softmax in
  # float32 even under bf16 compute, as transformers does.
  logits = jnp.einsum("blhd,bshd->bhls", q, k).astype(jnp.float32) * q.shape[-1]**-0.5
  if mask is not None:
    # `where`, not an additive bias, so masked logits can never overflow to -inf.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum("bhls,bshd->blhd", weights, v)


class CLIPAttention(nn.Module):
  """Multi-head self-attention with separate q/k/v/out projections (HF layout)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    """x: [B, L, H]; mask: bool broadcastable to [B, heads, L, L] -> [B, L, H]."""
    hidden = x.shape[-1]
    head_dim = hidden // self.num_heads
    dense = functools.partial(nn.Dense, hidden, dtype=self.dtype, param_dtype=jnp.float32)
    split = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, head_dim))
    q = split(dense(name="q_proj")(x))
    k = split(dense(name="k_proj")(x))
    v = split(dense(name="v_proj")(x))
    out = attend(q, k, v, mask, self.dtype).reshape(x.shape[:-1] + (hidden,))
    return dense(name="out_proj")(out)


class CLIPMLP(nn.Module):
  """fc1 -> activation -> fc2."""
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """[B, L, H] -> [B, L, H]."""
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
    y = dense(self.intermediate_size, name="fc1")(x)
    y = get_activation(self.hidden_act)(y)
    return dense(x.shape[-1], name="fc2")(y)


class CLIPEncoderLayer(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  num_heads: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None):
    """x: [B, L, H]; mask: bool [B, 1, L, L] or None -> [B, L, H]."""
    norm = functools.partial(LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype,
                             param_dtype=jnp.float32)
    x = x + CLIPAttention(self.num_heads, dtype=self.dtype, name="self_attn")(
        norm(name="layer_norm1")(x), mask)
    y = CLIPMLP(self.intermediate_size, self.hidden_act, dtype=self.dtype, name="mlp")(
        norm(name="layer_norm2")(x))
    return x + y


class CLIPEncoder(nn.Module):
  """A stack of `CLIPEncoderLayer`s named `layers_{i}` (HF `encoder.layers.{i}`)."""
  num_layers: int
  num_heads: int
  intermediate_size: int
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, mask=None):
    """x: [B, L, H]; mask: bool [B, 1, L, L] or None -> [B, L, H]."""
    # Rematerialise per block: activations of one block are recomputed in the
    # backward pass, so memory grows with the layer count only through x.
    layer_cls = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
    for i in range(self.num_layers):
      x = layer_cls(self.num_heads, self.intermediate_size, self.hidden_act,
                    self.layer_norm_eps, dtype=self.dtype, name=f"layers_{i}")(x, mask)
    return x


class CLIPVisionEmbeddings(nn.Module):
  """Patchify convolution (no bias) + learned CLS token + learned positions."""
  hidden_size: int
  patch_size: int
  image_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    """images: [B, H, W, C] -> tokens [B, 1 + (H/p)*(W/p), hidden]."""
    if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
      raise ValueError(f"CLIP vision input is {images.shape[1]}x{images.shape[2]} px; this model "
                       f"takes {self.image_size}x{self.image_size} (NHWC images expected)")
    p = self.patch_size
    patches = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                      dtype=self.dtype, param_dtype=jnp.float32, name="patch_embedding")(
                          images.astype(self.dtype))
    batch = patches.shape[0]
    patches = patches.reshape(batch, -1, self.hidden_size)  # row-major like torch's flatten(2)
    cls = self.param("class_embedding", nn.initializers.normal(self.hidden_size**-0.5),
                     (self.hidden_size,), jnp.float32)
    cls = jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, self.hidden_size))
    tokens = jnp.concatenate([cls, patches], axis=1)
    positions = nn.Embed(tokens.shape[1], self.hidden_size, dtype=self.dtype,
                         param_dtype=jnp.float32, name="position_embedding")(
                             jnp.arange(tokens.shape[1]))
    return tokens + positions[None]


class CLIPVisionEncoder(nn.Module):
  """CLIP ViT image tower (HF `CLIPVisionModel` + `visual_projection`).

  Attributes:
    image_size: input side in pixels (square).
    patch_size: patch side in pixels.
    hidden_size, num_layers, num_heads, intermediate_size: transformer shape.
    projection_dim: width of `visual_projection` (no bias); None = no projection
      (a bare `CLIPVisionModel` checkpoint), then the embedding is `pooled`.
    hidden_act, layer_norm_eps: as in the HF config.
    dtype: compute dtype; parameters are always float32.
    remat: rematerialise each transformer block in the backward pass.
  """
  image_size: int = 224
  patch_size: int = 32
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  projection_dim: Optional[int] = 512
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False):
    """Encodes images.

    Args:
      images: float [B, image_size, image_size, C] (NHWC), CLIP-normalised.
      train: unused (CLIP has no dropout at these settings); kept for a uniform API.

    Returns:
      (embedding [B, projection_dim or hidden] float32, aux) with aux
      'pooled' [B, hidden] (post-layernormed CLS), 'embedding' (same as the first
      return), 'last_hidden_state' [B, 1 + N, hidden] (pre-post-layernorm tokens,
      CLS first) and 'tokens' (alias of 'last_hidden_state').
    """
    del train
    norm = functools.partial(LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype,
                             param_dtype=jnp.float32)
    x = CLIPVisionEmbeddings(self.hidden_size, self.patch_size, self.image_size,
                             dtype=self.dtype, name="embeddings")(images)
    x = norm(name="pre_layrnorm")(x)  # sic: the HF attribute is misspelt
    x = CLIPEncoder(self.num_layers, self.num_heads, self.intermediate_size, self.hidden_act,
                    self.layer_norm_eps, dtype=self.dtype, remat=self.remat, name="encoder")(x)
    pooled = norm(name="post_layernorm")(x[:, 0])
    embedding = pooled
    if self.projection_dim is not None:
      embedding = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                           param_dtype=jnp.float32, name="visual_projection")(pooled)
    embedding = embedding.astype(jnp.float32)
    last = x.astype(jnp.float32)
    aux = {"pooled": pooled.astype(jnp.float32), "embedding": embedding,
           "last_hidden_state": last, "tokens": last}
    return embedding, aux


def eos_positions(ids: jnp.ndarray, eos_token_id: Union[int, None]) -> jnp.ndarray:
  """Index of the token CLIP pools, exactly as transformers' CLIPTextTransformer picks it.

  With `eos_token_id == 2` (the value in configs written before transformers
  PR #24773, e.g. openai/clip-vit-base-patch32) the pooled token is the one with
  the HIGHEST id (the original CLIP's EOT = 49407 is the largest id). Otherwise it
  is the FIRST position holding `eos_token_id` (the pad token may equal EOS); a
  row without it pools position 0, as in transformers.

  Args:
    ids: int [B, L].
    eos_token_id: the text config's `eos_token_id`.

  Returns:
    int32 [B].
  """
  if eos_token_id == 2:
    return jnp.argmax(ids, axis=-1).astype(jnp.int32)
  return jnp.argmax(ids == eos_token_id, axis=-1).astype(jnp.int32)


class CLIPTextEmbeddings(nn.Module):
  """Token embedding + learned absolute positions."""
  vocab_size: int
  max_position_embeddings: int
  hidden_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids):
    """ids: int [B, L] -> [B, L, hidden]."""
    embed = functools.partial(nn.Embed, features=self.hidden_size, dtype=self.dtype,
                              param_dtype=jnp.float32)
    x = embed(self.vocab_size, name="token_embedding")(ids)
    return x + embed(self.max_position_embeddings, name="position_embedding")(
        jnp.arange(ids.shape[1]))[None]


class CLIPTextEncoder(nn.Module):
  """CLIP causal text transformer (HF `CLIPTextModel` + `text_projection`).

  Attributes:
    vocab_size, max_position_embeddings: embedding table sizes.
    hidden_size, num_layers, num_heads, intermediate_size: transformer shape.
    projection_dim: width of `text_projection` (no bias); None = no projection.
    eos_token_id: selects the pooled token, see `eos_positions`.
    hidden_act, layer_norm_eps: as in the HF config.
    dtype: compute dtype; parameters are always float32.
    remat: rematerialise each transformer block in the backward pass.
  """
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  hidden_size: int = 512
  num_layers: int = 12
  num_heads: int = 8
  intermediate_size: int = 2048
  projection_dim: Optional[int] = 512
  eos_token_id: int = 2
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, ids, mask=None, train: bool = False):
    """Encodes token ids.

    Args:
      ids: int [B, L], L <= max_position_embeddings.
      mask: int/bool [B, L], 1 = real token; None = no padding.
      train: unused (no dropout); kept for a uniform API.

    Returns:
      (embedding [B, projection_dim or hidden] float32, aux) with aux 'pooled'
      [B, hidden] (the EOS row), 'embedding', 'last_hidden_state' [B, L, hidden]
      (after final_layer_norm), 'tokens' (alias), 'mask' [B, L] bool and
      'eos_index' [B] int32.
    """
    del train
    length = ids.shape[1]
    if length > self.max_position_embeddings:
      raise ValueError(f"text length {length} exceeds max_position_embeddings "
                       f"{self.max_position_embeddings}")
    x = CLIPTextEmbeddings(self.vocab_size, self.max_position_embeddings, self.hidden_size,
                           dtype=self.dtype, name="embeddings")(ids)
    mask = jnp.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    causal = jnp.tril(jnp.ones((length, length), bool))
    attn_mask = causal[None, None] & mask[:, None, None, :]  # [B, 1, L, L]
    x = CLIPEncoder(self.num_layers, self.num_heads, self.intermediate_size, self.hidden_act,
                    self.layer_norm_eps, dtype=self.dtype, remat=self.remat, name="encoder")(
                        x, attn_mask)
    x = LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                  name="final_layer_norm")(x)
    eos = eos_positions(ids, self.eos_token_id)
    pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
    embedding = pooled
    if self.projection_dim is not None:
      embedding = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                           param_dtype=jnp.float32, name="text_projection")(pooled)
    embedding = embedding.astype(jnp.float32)
    last = x.astype(jnp.float32)
    aux = {"pooled": pooled.astype(jnp.float32), "embedding": embedding,
           "last_hidden_state": last, "tokens": last, "mask": mask, "eos_index": eos}
    return embedding, aux


# Presets of the OpenAI checkpoints (openai/clip-vit-{base-patch32,base-patch16,large-patch14}).
CLIPVisionB32 = functools.partial(CLIPVisionEncoder, patch_size=32)
CLIPVisionB16 = functools.partial(CLIPVisionEncoder, patch_size=16)
CLIPVisionL14 = functools.partial(CLIPVisionEncoder, patch_size=14, hidden_size=1024,
                                  num_layers=24, num_heads=16, intermediate_size=4096,
                                  projection_dim=768)
CLIPTextB = functools.partial(CLIPTextEncoder)  # text tower of B/32 and B/16
CLIPTextL = functools.partial(CLIPTextEncoder, hidden_size=768, num_heads=12,
                              intermediate_size=3072, projection_dim=768)
# Text towers of OpenAI's RN50 / RN50x4 CLIPs (open_clip RN50.json, RN50x4.json).
CLIPTextRN50 = functools.partial(CLIPTextEncoder, projection_dim=1024)
CLIPTextRN50x4 = functools.partial(CLIPTextEncoder, hidden_size=640, num_heads=10,
                                   intermediate_size=2560, projection_dim=640)
# Tiny variants for tests (32 px images, patch 8, width 32, 2 layers).
CLIPVisionTiny = functools.partial(CLIPVisionEncoder, image_size=32, patch_size=8, hidden_size=32,
                                   num_layers=2, num_heads=4, intermediate_size=37,
                                   projection_dim=24)
CLIPTextTiny = functools.partial(CLIPTextEncoder, vocab_size=99, max_position_embeddings=16,
                                 hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37,
                                 projection_dim=24, eos_token_id=98)

VISION_PRESETS = {"clip_vit_b32": CLIPVisionB32, "clip_vit_b16": CLIPVisionB16,
                  "clip_vit_l14": CLIPVisionL14, "clip_vit_tiny": CLIPVisionTiny}
TEXT_PRESETS = {"clip_text_b": CLIPTextB, "clip_text_l": CLIPTextL,
                "clip_text_rn50": CLIPTextRN50, "clip_text_rn50x4": CLIPTextRN50x4,
                "clip_text_tiny": CLIPTextTiny}
