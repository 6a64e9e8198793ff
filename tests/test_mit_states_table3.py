"""MIT-States Table 3 as published: TIRG(noun, adjective) embeddings classify unseen pairs."""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cir_jax import mit_states_classification as cls

A = N = 6
# Unseen test pairs: noun i with adjectives i and i+1, so the noun alone (or the
# adjective alone) names at most half of them; every word is seen in training.
TEST = {(i, i) for i in range(N)} | {((i + 1) % A, i) for i in range(N)}
TRAIN = sorted({(a, n) for a in range(A) for n in range(N)} - TEST)
TEST = sorted(TEST)


class Features(nn.Module):
  """The 'image encoder' of the synthetic task: the features are the input."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return {"pooled": x}


def _images(pairs, per_pair, rng, adj_vec, noun_vec):
  """Compositional features u_a + v_n + noise for each (a, n), `per_pair` images each."""
  labels = np.repeat(np.arange(len(pairs)), per_pair)
  x = np.stack([adj_vec[pairs[k][0]] + noun_vec[pairs[k][1]] for k in labels])
  return (x + 0.15 * rng.normal(size=x.shape)).astype(np.float32), labels


def _fit_and_classify(ignore_adjective=False, steps=100):
  rng = np.random.default_rng(0)
  adj_vec, noun_vec = rng.normal(size=(A, 16)), rng.normal(size=(N, 16))
  x_train, y_train = _images(TRAIN, 8, rng, adj_vec, noun_vec)
  x_test, y_test = _images(TEST, 10, rng, adj_vec, noun_vec)
  model = cls.Table3Model(Features(), A, N, embed_dim=32)
  train_pairs, test_pairs = np.asarray(TRAIN), np.asarray(TEST)
  if ignore_adjective:  # the bug the test must catch: every pair composed with adjective 0
    train_pairs, test_pairs = train_pairs * [0, 1], test_pairs * [0, 1]
  params, stats = cls.init_table3(model, jnp.asarray(x_train[:2]), train_pairs)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  step = cls.make_train_step(model, tx)
  batch = np.random.default_rng(1)
  for _ in range(steps):
    rows = batch.choice(len(x_train), 64, replace=False)
    params, stats, opt_state, loss = step(params, stats, opt_state, jnp.asarray(x_train[rows]),
                                          jnp.asarray(y_train[rows]), jnp.asarray(train_pairs))
  variables = {"params": params, "batch_stats": stats}
  accuracy = cls.table3_accuracy(model, variables, [jnp.asarray(x_test)], y_test, test_pairs)
  return accuracy, float(loss), y_test


def test_table3_classifier_beats_constant_and_needs_the_adjective():
  accuracy, loss, y_test = _fit_and_classify()
  constant = 100.0 * np.bincount(y_test).max() / len(y_test)  # best constant guess: 8.3%
  assert accuracy > 90.0 > 10 * constant, (accuracy, loss)
  # Ignoring the adjective can name the noun but not which of its two unseen pairs.
  blind, _, _ = _fit_and_classify(ignore_adjective=True)
  assert blind <= 55.0, blind


def test_vocabulary_pairs_labels_and_unseen_words():
  train = [("x/1.jpg", "red", "apple"), ("x/2.jpg", "old", "tomato"), ("x/3.jpg", "red", "apple")]
  test = [("y/1.jpg", "red", "tomato"), ("y/2.jpg", "old", "apple")]
  vocab = cls.PairVocabulary.build(train, test)
  assert vocab.adjectives == ("old", "red") and vocab.nouns == ("apple", "tomato")
  np.testing.assert_array_equal(vocab.train_pairs, [[0, 1], [1, 0]])
  np.testing.assert_array_equal(vocab.test_pairs, [[0, 0], [1, 1]])
  np.testing.assert_array_equal(vocab.labels(test, vocab.test_pairs), [1, 0])
  np.testing.assert_array_equal(vocab.labels(train, vocab.train_pairs), [1, 0, 1])
  with pytest.raises(ValueError, match=r"test words \['sliced'\] never occur in training"):
    cls.PairVocabulary.build(train, test + [("y/3.jpg", "sliced", "apple")])


def test_nearest_pair_is_argmax_similarity():
  pairs = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  images = jnp.asarray([[0.9, 0.1], [0.1, 0.8], [-2.0, 0.5]])
  np.testing.assert_array_equal(cls.classify_nearest_pair(images, pairs), [0, 1, 2])


def test_train_table3_runs_on_the_compositional_layout(tmp_path):
  """Plumbing on a tiny MIT-States layout: a tiny ResNet, two steps, results.json written."""
  import json  # pylint: disable=g-import-not-at-top
  from configs import tirg_mit_states  # pylint: disable=g-import-not-at-top
  from tests import placeholder_images  # pylint: disable=g-import-not-at-top
  folders = ["red apple", "green tomato", "green apple", "red tomato"]
  placeholder_images.write_images([str(tmp_path / "images" / f / f"{i}.jpg") for f in folders
                                   for i in range(3)])
  (tmp_path / "compositional-split").mkdir()
  (tmp_path / "compositional-split" / "train_pairs.txt").write_text("red apple\ngreen tomato\n")
  (tmp_path / "compositional-split" / "test_pairs.txt").write_text("green apple\nred tomato\n")
  c = tirg_mit_states.get_config("table3,steps=2")
  assert c.data.mit_states_split == "compositional"
  c.data.manual_dir, c.data.image_size = str(tmp_path), 16
  c.model.image_encoder, c.model.embed_dim = "resnet_tiny", 8
  c.batch_size, c.eval.batch_size, c.log_every_steps = 4, 4, 1
  lines = []
  out = cls.train_table3(c, tmp_path / "run", log=lines.append)
  assert out["num_queries"] == 6 and out["num_gallery"] == 2
  assert out["metrics"]["accuracy"] in (0.0, 100 / 6, 200 / 6, 50.0, 400 / 6, 500 / 6, 100.0)
  assert json.loads((tmp_path / "run" / "results.json").read_text())["metrics"] == out["metrics"]
  assert any("step 2: loss" in line for line in lines)
