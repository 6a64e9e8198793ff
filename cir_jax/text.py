"""Tokenizers read from a local Hugging Face directory, applied to whole datasets up front.

The CLIP (byte-level BPE) and BERT (WordPiece) tokenizers are transformers'
own, loaded with `AutoTokenizer` from the checkpoint directory (no hub). Captions
are tokenised once, in batches, into fixed-length int32 arrays that the input
pipeline then slices per example, so no tokenisation runs in the hot path.

Padding is on the right; truncation keeps the special tokens (CLIP's EOS / BERT's
[SEP] stay the last real token), which CLIP's EOS pooling relies on.
"""
import os
from typing import Sequence

import numpy as np

# transformers prints "PyTorch was not found..." (an advisory warning) on import;
# our towers are Flax, so a runtime install without torch is the normal case.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
import transformers  # pylint: disable=g-import-not-at-top,wrong-import-position


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
  """Loads the tokenizer saved in a local directory (tokenizer_config.json + vocab files).

  Args:
    path: directory written by `tokenizer.save_pretrained` (e.g. a CLIP or BERT
      checkpoint directory).

  Returns:
    The transformers tokenizer.

  Raises:
    FileNotFoundError: if `path` is not a directory.
    ValueError: if the tokenizer has no padding token.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
  tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  if tokenizer.pad_token_id is None:
    raise ValueError(f"tokenizer in {path!r} has no pad token; fixed-length batches need one")
  return tokenizer


def tokenize_counting(tokenizer, texts: Sequence[str], max_len: int,
                     batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray, int]:
  """Tokenises all `texts` once, padded/truncated to `max_len`, counting the truncated ones.

  Each chunk is encoded once with room for one more token (max_len + 1): a row
  that fills it was longer than max_len, and dropping its last content token
  gives exactly the tokenizer's own truncation to max_len (the leading BOS/[CLS]
  and the trailing EOS/[SEP] are kept).

  Args:
    tokenizer: from `load_tokenizer`.
    texts: N non-empty strings (e.g. every caption of a dataset split).
    max_len: output length L, special tokens included (77 for CLIP).
    batch_size: texts per call into the (Rust) tokenizer; bounds peak memory.

  Returns:
    (ids, mask, num_truncated): ids and mask int32 [N, max_len]; mask is 1 on
    real tokens (special tokens included) and 0 on padding.

  Raises:
    TypeError: if an element is not a string.
    ValueError: if a text is empty or blank (it would encode to special tokens
      only and silently give a meaningless query), or max_len < 2.
  """
  if max_len < 2:
    raise ValueError(f"max_len must leave room for the special tokens, got {max_len}")
  texts = list(texts)
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(f"text {i} is a {type(text).__name__}, not a str: {text!r}")
    if not text.strip():
      raise ValueError(f"text {i} is empty ({text!r}); every caption needs words")
  ids = np.full((len(texts), max_len), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(texts), max_len), np.int32)
  truncated = 0
  for start in range(0, len(texts), batch_size):
    chunk = texts[start:start + batch_size]
    rows = tokenizer(chunk, truncation=True, max_length=max_len + 1,
                     return_attention_mask=False)["input_ids"]
    for i, row in enumerate(rows, start=start):
      if len(row) > max_len:
        row = row[:max_len - 1] + row[-1:]
        truncated += 1
      ids[i, :len(row)] = row
      mask[i, :len(row)] = 1
  return ids, mask, truncated


def tokenize(tokenizer, texts: Sequence[str], max_len: int,
             batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """(ids, mask) of `tokenize_counting` (see there)."""
  return tokenize_counting(tokenizer, texts, max_len, batch_size)[:2]
