"""CIRPLANT (Liu et al., ICCV 2021, section 3.2): a VLP transformer as the composer.

The reference image's pooled ResNet feature goes through a newly learned FC
layer and L2 normalisation, v = l2n(W f + b), and enters the (OSCAR/BERT)
transformer as one extra token after the text tokens. The transformer output
at that image token is the composed query. Candidate target images get the same
FC + L2 normalisation, v' = l2n(W f' + b), so both sides share one space; the
retrieval model then applies its L2 normalisation with the learnable scale
(init 4, as the authors' NormalizationLayer).

Paper vs authors' code: the code feeds the FC output (with OSCAR's dropout, no
L2 norm) as the token and L2-normalises only after the transformer; here the
paper's l2n(FC) token is used (with OSCAR's dropout 0.1 on it in training).
"""
import flax.linen as nn

from cir_jax.models.retrieval_model import l2_normalize


class CIRPLANT(nn.Module):
  """Image token for the text encoder, composed query at that token.

  Attributes:
    hidden_size: the BERT width H (768 for bert-base; the image token's width).
    dropout: dropout on the image token in training (OSCAR's hidden dropout).
  """
  hidden_size: int = 768
  dropout: float = 0.1
  output_kind = "embedding"
  joint_text_image = True

  def setup(self):
    self.image_fc = nn.Dense(self.hidden_size)
    self.token_dropout = nn.Dropout(self.dropout)

  def _project(self, image):
    return l2_normalize(self.image_fc(image["pooled"]))

  def image_tokens(self, image, train: bool = False):
    """dict 'pooled' [B, C] -> the image token [B, 1, H] appended to the text."""
    return self.token_dropout(self._project(image), deterministic=not train)[:, None]

  def __call__(self, image, text, train: bool = False):
    """text['tokens'] [B, L + 1, H] (image token last) -> ([B, H], aux)."""
    del image, train
    return text["tokens"][:, -1], {}

  def encode_target(self, image, train: bool = False):
    """Candidate images: dict 'pooled' [B, C] -> l2n(FC(pooled)) [B, H]."""
    del train
    return self._project(image)
