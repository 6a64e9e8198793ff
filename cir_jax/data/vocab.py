"""Word vocabulary for the LSTM text encoder (TIRG's SimpleVocab), tokenised in-graph.

The vocabulary is built once from the training captions; tokenisation of a whole
split is one vectorised TensorFlow call (lower-case, strip punctuation, split on
spaces, look up), so no Python runs per example. Without TensorFlow (the bare
accelerator machines of tools/device_check.py) the same tokenisation runs in
Python (`encode_python`; tests check the two agree).
"""
import collections
import json
import pathlib
import re
from typing import Iterable, Sequence

import numpy as np

PAD, UNK = "<pad>", "<unk>"
_NON_WORD = r"[^a-z0-9 ]"


def split_words(text: str) -> list[str]:
  """Python reference of the in-graph tokenisation (used to build the vocabulary)."""
  return re.sub(_NON_WORD, " ", text.lower()).split()


class Vocabulary:
  """Maps words to ids: 0 = padding, 1 = unknown, then words by decreasing frequency."""

  def __init__(self, words: Sequence[str]):
    self.words = [PAD, UNK] + [w for w in words if w not in (PAD, UNK)]
    self.index = {w: i for i, w in enumerate(self.words)}

  @classmethod
  def build(cls, texts: Iterable[str], min_count: int = 1) -> "Vocabulary":
    counts = collections.Counter(w for t in texts for w in split_words(t))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return cls(words)

  def __len__(self):
    return len(self.words)

  def save(self, path):
    pathlib.Path(path).write_text(json.dumps(self.words[2:]))

  @classmethod
  def load(cls, path) -> "Vocabulary":
    return cls(json.loads(pathlib.Path(path).read_text()))

  def encode(self, texts: Sequence[str], max_len: int):
    """Tokenises all `texts` at once in TensorFlow (in Python where it is not installed).

    Returns:
      ids int32 [N, max_len] (0-padded), mask bool [N, max_len], and the number
      of texts longer than max_len (truncated; the caller reports it).
    """
    try:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
    except ImportError:
      return self.encode_python(texts, max_len)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(self.words), tf.range(len(self.words),
                                                                              dtype=tf.int64)),
        default_value=1)
    text = tf.strings.regex_replace(tf.strings.lower(tf.constant(list(texts))), _NON_WORD, " ")
    words = tf.strings.split(text)
    lengths = words.row_lengths().numpy()
    ids = table.lookup(words).to_tensor(default_value=0, shape=[len(texts), max_len]).numpy()
    mask = np.arange(max_len)[None, :] < lengths[:, None]
    return ids.astype(np.int32), mask, int((lengths > max_len).sum())

  def encode_python(self, texts: Sequence[str], max_len: int):
    """`encode` without TensorFlow: the same ids, mask and truncation count.

    tf.strings.lower lower-cases ASCII only, so only ASCII is lower-cased here;
    every other character is a non-word character either way.
    """
    ids = np.zeros((len(texts), max_len), np.int32)
    lengths = np.zeros(len(texts), np.int64)
    for row, text in enumerate(texts):
      words = re.sub(_NON_WORD, " ", text.translate(_ASCII_LOWER)).split()
      lengths[row] = len(words)
      ids[row, :min(len(words), max_len)] = [self.index.get(w, 1) for w in words[:max_len]]
    mask = np.arange(max_len)[None, :] < lengths[:, None]
    return ids, mask, int((lengths > max_len).sum())


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
