"""MIT-States in the google/tirg layout: held-out nouns, queries, and Table 3 classification."""
import ml_collections
import numpy as np
import pytest

from cir_jax import mit_states_classification as cls
from cir_jax import retrieval
from cir_jax.data import mit_states
from tests import placeholder_images

FOLDERS = {"ripe tomato": 2, "rotten tomato": 1, "sliced tomato": 1,  # test noun
           "old camera": 1, "new camera": 2,                          # test noun
           "red apple": 2, "green apple": 1,                          # train noun
           "adj tomato": 3, "adj apple": 1,                           # placeholders: ignored
           "tomato": 1}                                               # no space: ignored


def config(root, **kw):
  c = ml_collections.ConfigDict(dict(manual_dir=str(root), data_dir=f"{root}_tfds",
                                     skip_missing_images=False,
                                     pairs_per_image=2, dataset_seed=0,
                                     mit_states_split="tirg"))
  c.update(kw)
  return c


@pytest.fixture
def root(tmp_path):
  paths = [str(tmp_path / "images" / f / f"img_{i}.jpg") for f, n in FOLDERS.items()
           for i in range(n)]
  placeholder_images.write_images(paths)
  return tmp_path


def test_held_out_nouns_and_test_queries(root):
  assert len(mit_states.TEST_NOUNS) == 49 and "apple" not in mit_states.TEST_NOUNS
  test = mit_states.load_mit_states_split(config(root), "test", log=lambda _: None)
  classes = mit_states.class_table(test)
  assert sorted(set(classes)) == ["new camera", "old camera", "ripe tomato", "rotten tomato",
                                  "sliced tomato"]
  # Every test image x every other adjective of its noun: tomato 4 x 2, camera 3 x 1.
  assert test.num_queries == 4 * 2 + 3 * 1
  for q in range(test.num_queries):
    ref_adj, noun = classes[test.ref_index[q]].split()
    assert test.texts[q] != ref_adj
    hits = [c for c, l in zip(classes, test.image_labels) if l == test.target_label[q]]
    assert set(hits) == {f"{test.texts[q]} {noun}"}
  train = mit_states.load_mit_states_split(config(root), "train", log=lambda _: None)
  assert set(mit_states.class_table(train)) == {"red apple", "green apple"}
  assert train.num_queries == 3 * 2  # pairs_per_image draws per image


def test_recall_counts_any_image_of_the_target_pair(root):
  test = mit_states.load_mit_states_split(config(root), "test", log=lambda _: None)
  g = test.num_images
  emb = np.eye(g, dtype=np.float32)
  # Each query points at the LAST gallery image of its target class (not the labelled row).
  last = {int(l): i for i, l in enumerate(test.image_labels)}
  query = emb[[last[int(l)] for l in test.target_label]]
  m = retrieval.evaluate_retrieval(query, emb, test.image_labels, test.target_label,
                                   exclude_index=test.ref_index, ks=(1, 5))
  assert m["R@1"] == pytest.approx(100.0)


def test_non_jpg_file_is_an_error(root):
  (root / "images" / "ripe tomato" / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match="notes.txt: not a .jpg"):
    mit_states.load_mit_states_split(config(root), "test")


def test_compositional_split_and_classification(root):
  (root / "compositional-split").mkdir()
  (root / "compositional-split" / "train_pairs.txt").write_text(
      "ripe tomato\nnew camera\nred apple\n")
  (root / "compositional-split" / "test_pairs.txt").write_text(
      "rotten tomato\nold camera\ngreen apple\n")
  train = mit_states.list_images(root, "train", "compositional")
  test = mit_states.list_images(root, "test", "compositional")
  pairs, rows, adjs, pair_of_query, test_ids = cls.prototype_table(train, test, 1, seed=0)
  assert pairs == ["green apple", "old camera", "rotten tomato"]
  assert [train[r][2] for r in rows] == ["apple", "camera", "tomato"] and adjs == [
      "green", "old", "rotten"]
  np.testing.assert_array_equal(test_ids, [0, 1, 2])  # test images sorted by folder
  # Prototypes from two queries per pair (one padded row with id 3 is ignored); images
  # nearest to prototypes 0, 2 and 2: two of three correct.
  query = np.array([[1, 0, 0], [1, .2, 0], [0, 1, 0], [0, 1, .1], [0, 0, 1], [9, 9, 9]],
                   np.float32)
  images = np.array([[1, .1, 0], [0, .3, 1], [0, .1, 1]], np.float32)
  pred = cls.classify_by_prototype(query, np.array([0, 0, 1, 1, 2, 3]), images, 3)
  np.testing.assert_array_equal(pred, [0, 2, 2])
  assert np.mean(pred == test_ids) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="no training images"):
    cls.prototype_table([t for t in train if t[2] != "apple"], test, 1, seed=0)


def test_classification_through_the_evaluator(root):
  """Plumbing of evaluate_prototype_variant with a fake model whose test images are orthogonal
  to every prototype: all scores tie at 0, argmax picks pair 0 ('green apple', 1 of 3)."""
  from cir_jax import sharding  # pylint: disable=g-import-not-at-top
  from cir_jax.data.vocab import Vocabulary  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  test_compositional_split_and_classification(root)  # writes the pair files
  c = common.base_config()
  c.data.name, c.data.manual_dir, c.data.image_size = "mit_states", str(root), 8
  c.data.mit_states_split = "compositional"
  c.eval.batch_size = 8
  out = cls.evaluate_prototype_variant(c, placeholder_images.OneHotModel(32),
                                    Vocabulary.build(["green", "old", "rotten"]),
                                    sharding.make_mesh(), {}, log=lambda _: None)
  assert out["metrics"]["accuracy"] == pytest.approx(100 / 3)
  assert out["num_queries"] == 3 and out["num_gallery"] == 3
