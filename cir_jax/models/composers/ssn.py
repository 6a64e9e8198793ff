"""SSN, the Semantic Shift Network ("Decompose Semantic Shifts for Composed Image
Retrieval", AAAI 2024, sections 3.2-3.5 and the network table of its appendix).

Token features (section 3.2): the CLIP image tokens [B, 1 + N, 768] (global
token first) projected to the text width d = 512 by a linear layer, and the CLIP
text tokens [B, L, d] with their mask.

Cross-modal decompose (section 3.3, Eq. 2-5), two unshared Linear(2d, 1) +
sigmoid layers:
  s_t = sigmoid(W_t [t_l; v_g])          per text token, v_g the global image token
  T+ = s_t * T,  T- = (1 - s_t) * T      positive / negative guiding text
  s_v = sigmoid(W_v [v_n; t_g])          per image token, t_g = masked mean of T-
  V+ = s_v * V,  V- = (1 - s_v) * V      visual prototype / discarded tokens

Late composition (section 3.4, Eq. 6): two branches (V+, T+) and (V-, T-); each
adds modality embeddings (Embedding(2, d)), runs the shared 1-layer 8-head
transformer encoder and pools (the fused global image token, the masked mean of
the fused text tokens). As in CLIP4Cir the output is
  out = r * MLP([t_pool; v_pool]) + lambda psi_T + (1 - lambda) psi_I,
with MLP = Linear(2d, 512) -> ReLU -> Linear(512, 512) (the table), lambda from a
sigmoid gate on the same input, psi the projected CLIP embeddings. The target
image's tokens go through the same fusion without text:
  target = r * fused_target[:, 0] + psi_target.
Only the positive branch is the query at inference; the negative one is returned
as aux['negative_query'] for the KL term of the loss (`losses.ssn_loss`).

Paper vs authors' code (starxing-yuu/SSN), and the choice made here:
* output MLP hidden width: table 512 (Linear(1024,512), Linear(512,512)); code
  1024 (Linear(1024,1024), Linear(1024,512)) -> the table (`hidden_dim`).
* the global text feature that conditions image decomposition: the paper says
  "exchange the positions of the two modalities"; the code uses the masked mean
  of the NEGATIVE guiding text -> the code (the paper leaves it open).
* r = 0.01 (the code; the paper does not scale the residual) -> `residual_scale`.
* pooled fused features: the paper says "learned pooled fused features"; the
  code takes the fused global image token and the masked mean of fused text
  tokens -> the code. The lambda gate is the code's (the paper does not say).
* padding: the code fuses without a key-padding mask (batches padded to the
  longest caption); with fixed-length padding that would let pad tokens in, so
  padded text tokens are masked out of attention here.
* the fusion layer is PyTorch's TransformerEncoderLayer defaults (post-norm,
  FFN 2048, ReLU, dropout 0.1), as in the code.

Ablations (Table 3) via `variant`: 'full' (V+, T+); 'no_decompose' (original V,
T; no negative branch, so no KL term); 'prototype_text' (V+, original T);
'image_positive_text' (original V, T+). `share_decompose` (Table 4) uses one
decompose layer for both modalities.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

VARIANTS = ("full", "no_decompose", "prototype_text", "image_positive_text")
TEXT, IMAGE = 1, 0  # modality ids (the code's token_type_text / token_type_ref)


def masked_mean(tokens, mask):
  """tokens [B, L, d], mask [B, L] -> mean over real tokens [B, d]."""
  m = mask.astype(tokens.dtype)[..., None]
  return (tokens * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


class FusionLayer(nn.Module):
  """A post-norm transformer encoder layer (torch.nn.TransformerEncoderLayer defaults)."""
  num_heads: int = 8
  ffn_dim: int = 2048
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x, mask, train: bool = False):
    """x [B, S, d], mask [B, S] bool (True = real token) -> [B, S, d]."""
    drop = lambda y: nn.Dropout(self.dropout, deterministic=not train)(y)
    attn = nn.MultiHeadDotProductAttention(self.num_heads, dropout_rate=self.dropout,
                                           deterministic=not train, name="self_attn")(
                                               x, x, mask=mask[:, None, None, :])
    x = nn.LayerNorm(epsilon=1e-5, name="norm1")(x + drop(attn))
    y = nn.Dense(self.ffn_dim, name="linear1")(x)
    y = nn.Dense(x.shape[-1], name="linear2")(drop(nn.relu(y)))
    return nn.LayerNorm(epsilon=1e-5, name="norm2")(x + drop(y))


class SSN(nn.Module):
  """(image dict 'tokens', 'projected'; text dict 'tokens', 'mask', 'projected') -> [B, d'].

  Attributes:
    width: d, the token width (the CLIP text hidden size, 512 for ViT-B).
    embed_dim: d', the CLIP embedding width (projection_dim, 512 for ViT-B).
    hidden_dim: hidden width of the output MLP and the gate (512, the table).
    num_heads, ffn_dim, dropout: the fusion transformer layer.
    residual_scale: r, the weight of the learned residual (0.01, the code).
    variant: one of VARIANTS (Table 3).
    share_decompose: one decompose layer for text and image (Table 4).
  """
  width: int = 512
  embed_dim: int = 512
  hidden_dim: int = 512
  num_heads: int = 8
  ffn_dim: int = 2048
  dropout: float = 0.1
  residual_scale: float = 0.01
  variant: str = "full"
  share_decompose: bool = False
  output_kind = "embedding"

  def setup(self):
    if self.variant not in VARIANTS:
      raise ValueError(f"unknown SSN variant {self.variant!r}; valid: {list(VARIANTS)}")
    self.image_token_proj = nn.Dense(self.width)
    self.text_decompose = nn.Dense(1)
    self.image_decompose = self.text_decompose if self.share_decompose else nn.Dense(1)
    self.modality_embeddings = nn.Embed(2, self.width)
    self.fusion = FusionLayer(self.num_heads, self.ffn_dim, self.dropout)
    self.combiner_layer = nn.Dense(self.hidden_dim)
    self.gate_hidden = nn.Dense(self.hidden_dim)
    self.gate_out = nn.Dense(1)
    self.output_layer = nn.Dense(self.embed_dim)

  def _project_image(self, image):
    if "tokens" not in image or "projected" not in image:
      raise ValueError(f"SSN needs image 'tokens' and 'projected' (a CLIP image encoder), "
                       f"got {sorted(image)}")
    if image["projected"].shape[-1] != self.embed_dim:
      raise ValueError(f"SSN embed_dim={self.embed_dim} must equal the CLIP embedding width "
                       f"{image['projected'].shape[-1]} (model.embed_dim)")
    return self.image_token_proj(image["tokens"])

  def _fuse(self, image_tokens, text_tokens=None, text_mask=None, train=False):
    """Eq. 6: modality embeddings + the transformer layer -> (fused image, fused text)."""
    x = image_tokens + self.modality_embeddings(jnp.asarray(IMAGE))
    mask = jnp.ones(x.shape[:2], bool)
    n = x.shape[1]
    if text_tokens is not None:
      x = jnp.concatenate([x, text_tokens + self.modality_embeddings(jnp.asarray(TEXT))], 1)
      mask = jnp.concatenate([mask, text_mask], 1)
    fused = self.fusion(x, mask, train=train)
    return fused[:, :n], fused[:, n:]

  def _compose(self, image, text, fused_image, fused_text, text_mask):
    """The Combiner-style output of one branch -> [B, d']."""
    h = jnp.concatenate([masked_mean(fused_text, text_mask), fused_image[:, 0]], axis=-1)
    residual = self.output_layer(nn.relu(self.combiner_layer(h)))
    lam = jax.nn.sigmoid(self.gate_out(nn.relu(self.gate_hidden(h))))
    return (self.residual_scale * residual + lam * text["projected"]
            + (1 - lam) * image["projected"]), lam[:, 0]

  def __call__(self, image, text, train: bool = False):
    v = self._project_image(image)                        # [B, 1 + N, d]
    t, mask = text["tokens"], text["mask"].astype(bool)   # [B, L, d], [B, L]
    if t.shape[-1] != self.width:
      raise ValueError(f"SSN width={self.width} must equal the text token width {t.shape[-1]}")
    if self.variant == "no_decompose":
      branches = {"query": (v, t)}
      aux = {}
    else:
      # Eq. 2-3: text tokens conditioned on the global image token.
      v_g = jnp.broadcast_to(v[:, :1], t.shape[:2] + (self.width,))
      s_t = jax.nn.sigmoid(self.text_decompose(jnp.concatenate([t, v_g], -1)))
      t_pos, t_neg = s_t * t, (1 - s_t) * t
      # Eq. 4-5: image tokens conditioned on the negative guiding text.
      t_g = jnp.broadcast_to(masked_mean(t_neg, mask)[:, None], v.shape)
      s_v = jax.nn.sigmoid(self.image_decompose(jnp.concatenate([v, t_g], -1)))
      v_pos, v_neg = s_v * v, (1 - s_v) * v
      positive = {"full": (v_pos, t_pos), "prototype_text": (v_pos, t),
                  "image_positive_text": (v, t_pos)}[self.variant]
      branches = {"query": positive, "negative_query": (v_neg, t_neg)}
      aux = {"text_weights": s_t[..., 0], "image_weights": s_v[..., 0]}
    outputs = {}
    for name, (vi, ti) in branches.items():
      fused_v, fused_t = self._fuse(vi, ti, mask, train)
      outputs[name], lam = self._compose(image, text, fused_v, fused_t, mask)
      if name == "query":
        aux["lambda"] = lam
    if "negative_query" in outputs:
      aux["negative_query"] = outputs["negative_query"]
    return outputs["query"], aux

  def encode_target(self, image, train: bool = False):
    """Target tokens through the fusion without text: r * fused[:, 0] + psi_I -> [B, d']."""
    fused_v, _ = self._fuse(self._project_image(image), train=train)
    if fused_v.shape[-1] != image["projected"].shape[-1]:
      raise ValueError(f"SSN width {fused_v.shape[-1]} must equal the CLIP embedding width "
                       f"{image['projected'].shape[-1]} (the target adds the two)")
    return self.residual_scale * fused_v[:, 0] + image["projected"]
