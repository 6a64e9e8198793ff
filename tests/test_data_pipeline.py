"""Vocabulary tokenisation and the index-driven tf.data pipeline."""
import jax
import numpy as np
import pytest

from cir_jax import sharding
from cir_jax.data import order
from cir_jax.data import pipeline
from cir_jax.data.tables import RetrievalSplit
from cir_jax.data.vocab import Vocabulary, split_words
from tests import fakes


def test_in_graph_tokenisation_matches_python_reference():
  texts = ["Add RED cube to top-left!", "remove  yellow sphere", "make middle-center object red",
           "add object", "unknown zebra words"]
  vocab = Vocabulary.build(texts[:4])
  ids, mask, truncated = vocab.encode(texts, max_len=5)
  for row, text in enumerate(texts):
    expected = [vocab.index.get(w, 1) for w in split_words(text)][:5]
    assert ids[row, :len(expected)].tolist() == expected
    assert mask[row].sum() == len(expected) and not ids[row, len(expected):].any()
  assert split_words(texts[0]) == ["add", "red", "cube", "to", "top", "left"]
  assert truncated == 1  # the first text has 6 words
  assert ids[4, 0] == 1  # unknown word


def test_vocabulary_round_trip(tmp_path):
  vocab = Vocabulary.build(["b a a", "c"])
  assert vocab.words == ["<pad>", "<unk>", "a", "b", "c"]
  vocab.save(tmp_path / "v.json")
  assert Vocabulary.load(tmp_path / "v.json").words == vocab.words


def _pipe(split, batch=8, devices=1, seed=0):
  mesh = sharding.make_mesh(jax.devices()[:devices])
  vocab = Vocabulary.build(split.texts)
  return pipeline.TrainPipeline(split, vocab, 8, batch, mesh, seed, 32)


def test_training_order_is_a_permutation_per_epoch_and_resumable():
  split = fakes.random_split(num_queries=20)
  pipe = _pipe(split, batch=8)
  stream = np.concatenate([pipe.step_indices(s).numpy() for s in range(10)])
  # drop_last: 2 full batches of 8 per epoch of 20; epoch e = permutation e cut at 16.
  assert pipe.steps_per_epoch() == 2
  for epoch in range(5):
    perm = order.epoch_permutation_np(0, epoch, 20)
    np.testing.assert_array_equal(stream[epoch * 16:(epoch + 1) * 16], perm[:16])
  assert not np.array_equal(stream[:16], stream[16:32])  # reshuffled each epoch
  assert len(set(stream.tolist())) == 20  # dropped ones come back in other epochs
  full = list(pipe.dataset(0).take(6).as_numpy_iterator())
  resumed = list(pipe.dataset(3).take(3).as_numpy_iterator())
  for a, b in zip(full[3:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  other_seed = _pipe(split, batch=8, seed=1)
  assert not np.array_equal(stream[:8], other_seed.step_indices(0).numpy())


def test_batches_hold_the_right_images_and_texts():
  split = fakes.random_split(num_queries=16)
  pipe = _pipe(split, batch=8, devices=8)
  batch = next(pipe.batches(0))
  q = pipe.step_indices(0).numpy()
  np.testing.assert_array_equal(np.asarray(batch["ref_image"]), split.images[split.ref_index[q]])
  np.testing.assert_array_equal(np.asarray(batch["target_image"]),
                                split.images[split.target_index[q]])
  assert batch["ref_image"].sharding.spec[0] == "data"
  assert len(batch["ref_image"].sharding.device_set) == 8


def test_process_slices_partition_the_global_batch(monkeypatch):
  split = fakes.random_split(num_queries=16)
  mesh = sharding.make_mesh(jax.devices()[:4])
  vocab = Vocabulary.build(split.texts)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  slices = []
  for p in range(2):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    pipe = pipeline.TrainPipeline(split, vocab, 8, 8, mesh, 0, 32)
    assert pipe.local_batch == 4
    slices.append(next(pipe.dataset(0).as_numpy_iterator())["text_ids"])
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  whole = next(_pipe(split, batch=8, devices=4).dataset(0).as_numpy_iterator())["text_ids"]
  np.testing.assert_array_equal(np.concatenate(slices), whole)


def test_eval_batches_pad_to_whole_global_batches():
  split = fakes.random_split(num_images=21, num_queries=13)
  mesh = sharding.make_mesh(jax.devices()[:8])
  vocab = Vocabulary.build(split.texts)
  data = pipeline.EvalPipeline(split, vocab, 8, 8, mesh, 32)
  gallery = list(data.gallery_batches())
  assert len(gallery) == 3 and set(gallery[0]) == {"image"}
  images = np.concatenate([np.asarray(b["image"]) for b in gallery])
  assert images.shape[0] == 24  # 21 rows + 3 of padding (item 0), masked by the evaluator
  np.testing.assert_array_equal(images[:21], split.images)
  np.testing.assert_array_equal(images[21:], split.images[[0, 0, 0]])
  queries = list(data.query_batches())
  assert len(queries) == 2 == data.num_steps(13)
  refs = np.concatenate([np.asarray(b["ref_image"]) for b in queries])
  np.testing.assert_array_equal(refs[:13], split.images[split.ref_index])


def test_bad_inputs_are_named():
  split = fakes.random_split(num_queries=16)
  with pytest.raises(ValueError, match="batch_size=12 must be a positive multiple of the number "
                                       "of devices \\(8 devices"):
    _pipe(split, batch=12, devices=8)
  bad = fakes.random_split(num_queries=16)
  bad.texts = list(bad.texts)
  bad.texts[5] = "  "
  with pytest.raises(ValueError, match="empty modification text for query 5"):
    _pipe(bad)
  bad.texts[5] = "?!"
  with pytest.raises(ValueError, match="random/train: query 5 text '\\?!' has no words"):
    _pipe(bad)
  bad = fakes.random_split(num_images=10, num_queries=16)
  bad.target_index = bad.target_index.copy()
  bad.target_index[3] = 10
  with pytest.raises(ValueError, match="target_index\\[3\\] = 10 is outside the gallery of 10"):
    bad.validate()


def test_images_decoded_from_files(tmp_path):
  import PIL.Image
  split = fakes.random_split(num_images=6, num_queries=8)
  paths = []
  for i, image in enumerate(split.images):
    paths.append(tmp_path / f"{i}.png")
    PIL.Image.fromarray(image).save(paths[-1])
  from_files = RetrievalSplit(**{**split.__dict__, "images": None, "image_paths": paths})
  a = next(_pipe(split).dataset(0).as_numpy_iterator())
  b = next(_pipe(from_files).dataset(0).as_numpy_iterator())
  np.testing.assert_array_equal(a["ref_image"], b["ref_image"])
