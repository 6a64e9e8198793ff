"""Show and Tell: one LSTM reads the image feature, then the words of the text.

TIRG paper, section 3.1: "Show and Tell [49]. In this approach, we train an
LSTM to encode both image and text by inputting the image feature first,
following by words in the text; the final state of this LSTM is used as
representation phi_xt." Original method: Vinyals, Toshev, Bengio and Erhan,
"Show and Tell: A Neural Image Caption Generator", CVPR 2015, which feeds the
CNN image embedding (projected to the word-embedding width) as the LSTM's
first input, x_{-1} = W_e CNN(I), followed by the word embeddings.

The words are the text encoder's own embeddings (text['word_embeddings']), so
the text encoder's LSTM is unused by this composer; text['mask'] gives the
lengths, and the state read out is the one after the last real word.
"""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp


class ShowAndTell(nn.Module):
  """[image; words] -> LSTM -> final state -> linear (output_kind 'embedding').

  Attributes:
    embed_dim: output width d.
    hidden_dim: LSTM width (default: embed_dim).
  """
  embed_dim: int = 512
  hidden_dim: Optional[int] = None
  output_kind = "embedding"

  @nn.compact
  def __call__(self, image, text, train: bool = False):
    """image['embedding'] [B, d], words [B, L, E] and mask [B, L] of `text` -> [B, d]."""
    del train
    words, mask = text["word_embeddings"], text["mask"].astype(bool)
    first = nn.Dense(words.shape[-1], name="image_to_word")(image["embedding"])
    sequence = jnp.concatenate([first[:, None, :].astype(words.dtype), words], axis=1)
    # The image is step 0, word k is step k + 1: read the state after the last real word.
    lengths = 1 + mask.sum(axis=1)
    outputs = nn.RNN(nn.OptimizedLSTMCell(self.hidden_dim or self.embed_dim), name="lstm")(
        sequence, seq_lengths=lengths)                            # [B, L + 1, H]
    last = jnp.take_along_axis(outputs, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return nn.Dense(self.embed_dim, name="out")(last), {}
