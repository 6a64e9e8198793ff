"""BERT encoder (Flax Linen) matching transformers' `BertModel`, for CIRPLANT.

Submodules carry the PyTorch attribute names (`embeddings/word_embeddings`,
`encoder/layer_{i}/attention/self/query`, ..., `pooler/dense`), so
`cir_jax.pretrained` maps `bert-base-uncased`-style checkpoints one to one.

CIRPLANT feeds an OSCAR-style vision-and-language transformer: the reference
image feature, projected to the hidden width by the caller, is appended as an
extra token AFTER the text embedding layer (it gets no position or token-type
embedding and no embedding LayerNorm, as in OSCAR's `BertImgModel`) and takes
part in self-attention through its own mask entry. `extra_embeddings` does that.
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from cir_jax.models.clip import LayerNorm
from cir_jax.models.clip import get_activation


class BertSelfAttention(nn.Module):
  """Multi-head attention with HF names query/key/value; dropout on the weights."""
  num_heads: int
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, train: bool = False):
    """x: [B, L, H]; mask: bool [B, 1, 1, L] -> context [B, L, H]."""
    hidden = x.shape[-1]
    head_dim = hidden // self.num_heads
    dense = functools.partial(nn.Dense, hidden, dtype=self.dtype, param_dtype=jnp.float32)
    split = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, head_dim))
    q = split(dense(name="query")(x))
    k = split(dense(name="key")(x))
    v = split(dense(name="value")(x))
    logits = jnp.einsum("blhd,bshd->bhls", q, k).astype(jnp.float32) * head_dim**-0.5
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate, deterministic=not train)(weights)
    return jnp.einsum("bhls,bshd->blhd", weights, v).reshape(x.shape)


class BertAddNorm(nn.Module):
  """dense -> dropout -> LayerNorm(. + residual) (HF BertSelfOutput / BertOutput)."""
  features: int
  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, residual, train: bool = False):
    """x: [B, L, *]; residual: [B, L, features] -> [B, L, features]."""
    y = nn.Dense(self.features, dtype=self.dtype, param_dtype=jnp.float32, name="dense")(x)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    return LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                     name="LayerNorm")(y + residual)


class BertAttention(nn.Module):
  """`self` (attention) + `output` (dense, dropout, residual LayerNorm)."""
  num_heads: int
  hidden_dropout_prob: float = 0.1
  attention_dropout_prob: float = 0.1
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, train: bool = False):
    """x: [B, L, H]; mask: bool [B, 1, 1, L] -> [B, L, H]."""
    ctx = BertSelfAttention(self.num_heads, self.attention_dropout_prob, dtype=self.dtype,
                            name="self")(x, mask, train)
    return BertAddNorm(x.shape[-1], self.hidden_dropout_prob, self.layer_norm_eps,
                       dtype=self.dtype, name="output")(ctx, x, train)


class BertIntermediate(nn.Module):
  """dense -> activation (the first half of BERT's feed-forward)."""
  intermediate_size: int
  hidden_act: str = "gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """[B, L, H] -> [B, L, intermediate_size]."""
    y = nn.Dense(self.intermediate_size, dtype=self.dtype, param_dtype=jnp.float32,
                 name="dense")(x)
    return get_activation(self.hidden_act)(y)


class BertLayer(nn.Module):
  """Post-LayerNorm transformer block of BERT."""
  num_heads: int
  intermediate_size: int
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_dropout_prob: float = 0.1
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, train: bool = False):
    """x: [B, L, H]; mask: bool [B, 1, 1, L] -> [B, L, H]."""
    x = BertAttention(self.num_heads, self.hidden_dropout_prob, self.attention_dropout_prob,
                      self.layer_norm_eps, dtype=self.dtype, name="attention")(x, mask, train)
    y = BertIntermediate(self.intermediate_size, self.hidden_act, dtype=self.dtype,
                         name="intermediate")(x)
    return BertAddNorm(x.shape[-1], self.hidden_dropout_prob, self.layer_norm_eps,
                       dtype=self.dtype, name="output")(y, x, train)


class BertLayerStack(nn.Module):
  """`num_layers` BertLayers named `layer_{i}` (HF `encoder.layer.{i}`)."""
  num_layers: int
  layer_kwargs: dict
  remat: bool = False

  @nn.compact
  def __call__(self, x, mask, train: bool = False):
    """x: [B, L, H]; mask: bool [B, 1, 1, L] -> [B, L, H]."""
    # `train` is a Python bool that selects dropout: static under remat.
    layer_cls = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
    for i in range(self.num_layers):
      x = layer_cls(**self.layer_kwargs, name=f"layer_{i}")(x, mask, train)
    return x


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""
  vocab_size: int
  max_position_embeddings: int
  type_vocab_size: int
  hidden_size: int
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, ids, token_type_ids, train: bool = False):
    """ids, token_type_ids: int [B, L] -> [B, L, hidden]."""
    embed = functools.partial(nn.Embed, features=self.hidden_size, dtype=self.dtype,
                              param_dtype=jnp.float32)
    x = embed(self.vocab_size, name="word_embeddings")(ids)
    x = x + embed(self.type_vocab_size, name="token_type_embeddings")(token_type_ids)
    x = x + embed(self.max_position_embeddings, name="position_embeddings")(
        jnp.arange(ids.shape[1]))[None]
    x = LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32,
                  name="LayerNorm")(x)
    return nn.Dropout(self.hidden_dropout_prob, deterministic=not train)(x)


class BertPooler(nn.Module):
  """tanh(dense(first token))."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, first):
    """[B, H] -> [B, H]."""
    return jnp.tanh(nn.Dense(first.shape[-1], dtype=self.dtype, param_dtype=jnp.float32,
                             name="dense")(first))


class BertEncoder(nn.Module):
  """BERT embeddings + encoder + pooler (HF `BertModel`).

  Attributes:
    vocab_size, max_position_embeddings, type_vocab_size: embedding table sizes.
    hidden_size, num_layers, num_heads, intermediate_size: transformer shape.
    hidden_act, layer_norm_eps: as in the HF config.
    hidden_dropout_prob, attention_dropout_prob: dropout rates (active if train).
    add_pooling_layer: build `pooler` (dense + tanh on the first token).
    dtype: compute dtype; parameters are always float32.
    remat: rematerialise each transformer block in the backward pass.
  """
  vocab_size: int = 30522
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_dropout_prob: float = 0.1
  add_pooling_layer: bool = True
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, ids, mask=None, token_type_ids=None,
               extra_embeddings: Optional[jnp.ndarray] = None,
               extra_mask: Optional[jnp.ndarray] = None, train: bool = False):
    """Encodes token ids, optionally followed by extra (e.g. image) tokens.

    Args:
      ids: int [B, L] WordPiece ids ([CLS] ... [SEP] [PAD]...).
      mask: int/bool [B, L], 1 = real token; None = all real.
      token_type_ids: int [B, L]; None = zeros (segment A).
      extra_embeddings: optional float [B, E, hidden] appended after the text
        embeddings (post embedding-LayerNorm, OSCAR-style).
      extra_mask: int/bool [B, E] for the extra tokens; None = all attended.
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      (pooled [B, hidden] float32, aux) with aux 'pooled', 'last_hidden_state'
      [B, L + E, hidden] float32, 'tokens' (alias) and 'mask' [B, L + E] bool.
      Without a pooling layer 'pooled' is the first token's hidden state.
    """
    length = ids.shape[1]
    if length > self.max_position_embeddings:
      raise ValueError(f"text length {length} exceeds max_position_embeddings "
                       f"{self.max_position_embeddings}")
    mask = jnp.ones(ids.shape, bool) if mask is None else mask.astype(bool)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(ids)
    x = BertEmbeddings(self.vocab_size, self.max_position_embeddings, self.type_vocab_size,
                       self.hidden_size, self.layer_norm_eps, self.hidden_dropout_prob,
                       dtype=self.dtype, name="embeddings")(ids, token_type_ids, train)
    if extra_embeddings is not None:
      if extra_embeddings.ndim != 3 or extra_embeddings.shape[-1] != self.hidden_size:
        raise ValueError(f"extra_embeddings must be [B, E, {self.hidden_size}], got "
                         f"{extra_embeddings.shape}")
      if extra_mask is None:
        extra_mask = jnp.ones(extra_embeddings.shape[:2], bool)
      x = jnp.concatenate([x, extra_embeddings.astype(self.dtype)], axis=1)
      mask = jnp.concatenate([mask, extra_mask.astype(bool)], axis=1)
    # Mask keys only: padded queries are still computed (and ignored), as in HF.
    attn_mask = mask[:, None, None, :]
    layer_kwargs = dict(num_heads=self.num_heads, intermediate_size=self.intermediate_size,
                        hidden_act=self.hidden_act, hidden_dropout_prob=self.hidden_dropout_prob,
                        attention_dropout_prob=self.attention_dropout_prob,
                        layer_norm_eps=self.layer_norm_eps, dtype=self.dtype)
    x = BertLayerStack(self.num_layers, layer_kwargs, remat=self.remat, name="encoder")(
        x, attn_mask, train)
    if self.add_pooling_layer:
      pooled = BertPooler(dtype=self.dtype, name="pooler")(x[:, 0])
    else:
      pooled = x[:, 0]
    pooled = pooled.astype(jnp.float32)
    last = x.astype(jnp.float32)
    return pooled, {"pooled": pooled, "last_hidden_state": last, "tokens": last, "mask": mask}


BertBase = functools.partial(BertEncoder)
BertLarge = functools.partial(BertEncoder, hidden_size=1024, num_layers=24, num_heads=16,
                              intermediate_size=4096)
BertTiny = functools.partial(BertEncoder, vocab_size=99, max_position_embeddings=24,
                             hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37)

PRESETS = {"bert_base": BertBase, "bert_large": BertLarge, "bert_tiny": BertTiny}
