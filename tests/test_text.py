"""Tokenizers from a local directory: CLIP BPE and BERT WordPiece, padded and truncated."""
import json

import numpy as np
import pytest
import transformers

from cir_jax import text
from cir_jax.data.tokenizer_vocab import TokenizerVocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
# Ranked merges; the vocabulary holds every intermediate result.
MERGES = ["r e", "re d</w>", "d re", "dre s", "dres s</w>", "s h", "sh i", "shi r", "shir t</w>"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """A tiny CLIP BPE tokenizer from hand-written vocab.json / merges.txt."""
  directory = tmp_path_factory.mktemp("clip_tok")
  tokens = CHARS + [c + "</w>" for c in CHARS] + [m.replace(" ", "") for m in MERGES] + [BOS, EOS]
  (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
  (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
  tokenizer = transformers.CLIPTokenizer(vocab=str(directory / "vocab.json"),
                                         merges=str(directory / "merges.txt"))
  tokenizer.save_pretrained(directory)
  return str(directory)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  """A tiny uncased WordPiece tokenizer from a hand-written vocab.txt."""
  directory = tmp_path_factory.mktemp("bert_tok")
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "dress", "shirt", "##es",
           "##s", "the", "is", "blue", "with", ",", "!", ".", "'"]
  (directory / "vocab.txt").write_text("\n".join(words) + "\n")
  tokenizer = transformers.BertTokenizer(vocab=str(directory / "vocab.txt"), do_lower_case=True)
  tokenizer.save_pretrained(directory)
  return str(directory)


SENTENCES = ["A red dress.", "Red, DRESS!", "the shirts is blue", "shirt shirt shirt shirt shirt"]


def test_clip_bpe_ids_mask_and_truncation(clip_dir):
  tokenizer = text.load_tokenizer(clip_dir)
  ids, mask = text.tokenize(tokenizer, SENTENCES, max_len=8)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (4, 8)
  tokens = [tokenizer.convert_ids_to_tokens(row[m == 1]) for row, m in zip(ids, mask)]
  # Lower-cased, punctuation split off, BPE merges applied by rank.
  assert tokens[0] == [BOS, "a</w>", "red</w>", "dress</w>", ".</w>", EOS]
  assert tokens[1] == [BOS, "red</w>", ",</w>", "dress</w>", "!</w>", EOS]
  assert tokens[2][:5] == [BOS, "t", "h", "e</w>", "shir"]  # sub-words without a full merge
  # Over-long input: cut to max_len with EOS kept last (CLIP pools at EOS).
  assert tokens[3] == [BOS] + ["shirt</w>"] * 5 + [EOS] and mask[3].sum() == 7
  for row, sentence in enumerate(SENTENCES):
    full = tokenizer(sentence)["input_ids"]
    n = int(mask[row].sum())
    expected = full if len(full) <= 8 else full[:7] + [full[-1]]
    np.testing.assert_array_equal(ids[row, :n], expected)
    assert np.all(mask[row, :n] == 1) and np.all(mask[row, n:] == 0)
    assert np.all(ids[row, n:] == tokenizer.pad_token_id)  # pad is EOS, as in OpenAI's CLIP
  assert tokenizer.pad_token == EOS


def test_bert_wordpiece_ids_mask_and_truncation(bert_dir):
  tokenizer = text.load_tokenizer(bert_dir)
  sentences = ["Red dresses, the SHIRT!", "a zebra's dress", "blue " * 20]
  ids, mask = text.tokenize(tokenizer, sentences, max_len=10)
  tokens = [tokenizer.convert_ids_to_tokens(row[m == 1]) for row, m in zip(ids, mask)]
  assert tokens[0] == ["[CLS]", "red", "dress", "##es", ",", "the", "shirt", "!", "[SEP]"]
  assert tokens[1] == ["[CLS]", "a", "[UNK]", "'", "[UNK]", "dress", "[SEP]"]
  assert tokens[2] == ["[CLS]"] + ["blue"] * 8 + ["[SEP]"]
  np.testing.assert_array_equal(mask.sum(axis=1), [9, 7, 10])
  assert ids[0, 9] == tokenizer.pad_token_id == 0
  for row, sentence in enumerate(sentences[:2]):
    full = tokenizer(sentence)["input_ids"]
    np.testing.assert_array_equal(ids[row, :len(full)], full)


def test_batched_equals_single_call(clip_dir):
  tokenizer = text.load_tokenizer(clip_dir)
  texts = SENTENCES * 3
  one = text.tokenize(tokenizer, texts, max_len=12)
  chunked = text.tokenize(tokenizer, texts, max_len=12, batch_size=5)
  np.testing.assert_array_equal(one[0], chunked[0])
  np.testing.assert_array_equal(one[1], chunked[1])


def test_bad_inputs_fail_clearly(clip_dir, tmp_path):
  tokenizer = text.load_tokenizer(clip_dir)
  with pytest.raises(ValueError, match="text 1 is empty"):
    text.tokenize(tokenizer, ["a red dress", "  "], max_len=8)
  with pytest.raises(TypeError, match="text 0 is a NoneType"):
    text.tokenize(tokenizer, [None], max_len=8)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    text.load_tokenizer(str(tmp_path / "nowhere"))


def test_tokenizer_vocabulary_tokenises_each_text_once_and_counts_truncation(clip_dir):
  vocab = TokenizerVocabulary(clip_dir)
  calls = []
  original = type(vocab.tokenizer).__call__

  def counting(self, texts, *args, **kwargs):
    calls.append(len(texts))
    return original(self, texts, *args, **kwargs)

  type(vocab.tokenizer).__call__ = counting
  try:
    ids, mask, truncated = vocab.encode(SENTENCES, max_len=6)
  finally:
    type(vocab.tokenizer).__call__ = original
  assert calls == [len(SENTENCES)]  # one pass over the texts
  full = [vocab.tokenizer(s)["input_ids"] for s in SENTENCES]
  assert truncated == sum(len(f) > 6 for f in full) == 2
  reference = vocab.tokenizer(SENTENCES, truncation=True, max_length=6, padding="max_length")
  np.testing.assert_array_equal(ids, reference["input_ids"])
  np.testing.assert_array_equal(mask, np.asarray(reference["attention_mask"], bool))
