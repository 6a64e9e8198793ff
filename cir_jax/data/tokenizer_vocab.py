"""A Hugging Face tokenizer behind the word vocabulary's interface.

`config.data.tokenizer` is 'vocab' (the word vocabulary of `vocab.py`, for the
LSTM) or the path of a local tokenizer directory (a CLIP or BERT checkpoint
directory) for pretrained text towers. Both expose `len()` and
`encode(texts, max_len) -> (ids, mask, num_truncated)`, so the input pipelines
tokenise every split once, up front, either way.
"""
from typing import Sequence

from cir_jax import text as text_lib


class TokenizerVocabulary:
  """Tokenises with `cir_jax.text` (special tokens included, right padding)."""

  def __init__(self, path: str):
    self.path = path
    self.tokenizer = text_lib.load_tokenizer(path)

  def __len__(self) -> int:
    return len(self.tokenizer)

  def encode(self, texts: Sequence[str], max_len: int):
    """-> ids int32 [N, max_len], mask bool [N, max_len], number of truncated texts.

    Each text goes through the tokenizer once (`text.tokenize_counting`)."""
    ids, mask, truncated = text_lib.tokenize_counting(self.tokenizer, texts, max_len)
    return ids, mask.astype(bool), truncated
