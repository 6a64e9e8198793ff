"""CIRPLANT (Liu et al., ICCV 2021, section 3.2): a VLP transformer as the composer.

The reference image's pooled ResNet feature goes through a newly learned FC
layer and enters the (OSCAR/BERT) transformer as one extra token after the text
tokens (after BERT's embedding LayerNorm, as OSCAR appends its image features).
The transformer output at that image token is the composed query. Candidate
target images go through the same FC, so both sides share one space; the
retrieval model then applies its L2 normalisation with the learnable scale
(init 4, the authors' NormalizationLayer) to queries and targets alike.

Paper vs the authors' code (Cuberick-Orion/CIRPLANT, model/OSCAR): the paper
says the token is l2n(FC f); the code feeds dropout(FC f) with no L2 norm
(`BertImgModel.forward`: img_embedding -> dropout, `use_img_layernorm` off in
the run script) and normalises only after the transformer. `token_norm='none'`
(the default) is the code: the FC output then has a norm of the order of the
text embeddings (~20 for BERT-base), while a unit-norm token ('l2', the paper's
text) is ~20x smaller than every word embedding next to it, so attention and
the residual stream barely see the image at initialisation. Dropout on the
token uses `dropout` (the run script's --drop_out 0.3 sets OSCAR's
hidden_dropout_prob, which is also the image-embedding dropout).
"""
import flax.linen as nn

from cir_jax.models.retrieval_model import l2_normalize

TOKEN_NORMS = ("none", "l2")


class CIRPLANT(nn.Module):
  """Image token for the text encoder, composed query at that token.

  Attributes:
    hidden_size: the BERT width H (768 for bert-base; the image token's width).
    dropout: dropout on the image token in training (OSCAR's hidden dropout).
    token_norm: 'none' (authors' code: the token is FC f) or 'l2' (the paper's
      text: l2n(FC f)). Targets are FC f either way (normalised by the model).
  """
  hidden_size: int = 768
  dropout: float = 0.1
  token_norm: str = "none"
  output_kind = "embedding"
  joint_text_image = True

  def setup(self):
    if self.token_norm not in TOKEN_NORMS:
      raise ValueError(f"cirplant composer_kwargs.token_norm={self.token_norm!r}; valid: "
                       f"{TOKEN_NORMS}")
    self.image_fc = nn.Dense(self.hidden_size)
    self.token_dropout = nn.Dropout(self.dropout)

  def image_tokens(self, image, train: bool = False):
    """dict 'pooled' [B, C] -> the image token [B, 1, H] appended to the text."""
    token = self.image_fc(image["pooled"])
    if self.token_norm == "l2":
      token = l2_normalize(token)
    return self.token_dropout(token, deterministic=not train)[:, None]

  def __call__(self, image, text, train: bool = False):
    """text['tokens'] [B, L + 1, H] (image token last) -> ([B, H], aux)."""
    del image, train
    return text["tokens"][:, -1], {}

  def encode_target(self, image, train: bool = False):
    """Candidate images: dict 'pooled' [B, C] -> FC(pooled) [B, H] (the model L2-normalises)."""
    del train
    return self.image_fc(image["pooled"])
