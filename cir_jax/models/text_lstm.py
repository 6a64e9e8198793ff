"""LSTM text encoder of the TIRG paper (section 3: hidden size 512, final state).

Matches google/tirg's TextLSTMModel: word embedding -> one LSTM layer -> the
output at the last real token -> dropout(0.1) -> linear. Also returns the token
outputs and the word embeddings for composers that read the words themselves
(Show and Tell).
"""
import flax.linen as nn
import jax.numpy as jnp

from cir_jax.models import fused_lstm


class LSTMTextEncoder(nn.Module):
  """Word embedding + single-layer LSTM.

  Attributes:
    vocab_size: size of the vocabulary (id 0 is padding, id 1 unknown).
    word_dim: word embedding width (512 in the paper).
    hidden_dim: LSTM state width (512 in the paper).
    out_dim: width of the pooled output (the embedding dimension).
  """
  vocab_size: int
  word_dim: int = 512
  hidden_dim: int = 512
  out_dim: int = 512
  dropout: float = 0.1

  @nn.compact
  def __call__(self, ids, mask, train: bool = False):
    """Encodes token ids.

    Args:
      ids: int32 [B, L] token ids, 0 = padding.
      mask: bool/int [B, L], 1 for real tokens (left-aligned).
      train: enables dropout.

    Returns:
      dict with 'pooled' [B, out_dim], 'tokens' [B, L, hidden_dim] (LSTM outputs),
      'word_embeddings' [B, L, word_dim] and 'mask' [B, L] bool.
    """
    mask = mask.astype(bool)
    words = nn.Embed(self.vocab_size, self.word_dim, name="embed")(ids)
    lengths = jnp.maximum(mask.sum(axis=1), 1)
    # nn.RNN(nn.OptimizedLSTMCell(hidden_dim))'s parameters and outputs, hoisted schedule.
    outputs = fused_lstm.lstm_sequence(words, *fused_lstm.LSTMCellParams(
        self.hidden_dim, name="OptimizedLSTMCell_0")(words))
    last = jnp.take_along_axis(outputs, (lengths - 1)[:, None, None], axis=1)[:, 0]
    pooled = nn.Dense(self.out_dim, name="out")(
        nn.Dropout(self.dropout, deterministic=not train)(last))
    return {"pooled": pooled, "tokens": outputs, "word_embeddings": words, "mask": mask}
