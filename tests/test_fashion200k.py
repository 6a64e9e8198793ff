"""Fashion200k in the google/tirg layout: one-word training pairs, test queries, target sets."""
import ml_collections
import numpy as np
import pytest

from cir_jax import retrieval
from cir_jax.data import fashion200k
from tests import placeholder_images

TRAIN = {"dress": ["red floral dress"] * 3 + ["blue floral dress"] * 2 + ["red striped dress",
                                                                       "black maxi dress"],
         "jacket": ["black leather jacket", "brown leather jacket"],
         "pants": ["wide leg trouser"], "skirt": ["pleated mini skirt", "pleated midi skirt"],
         "top": ["3.1 phillip top", "3.2 phillip top"]}
TEST = {"dress": ["red floral dress", "red floral dress", "blue floral dress",
                  "green floral dress"],
        "jacket": ["black leather jacket", "brown leather jacket", "brown leather jacket"],
        "pants": ["wide leg trouser"], "skirt": ["pleated mini skirt"], "top": ["white top"]}


def write_fixture(root, test_queries):
  (root / "labels").mkdir(parents=True)
  paths = []
  for split, table in (("train", TRAIN), ("test", TEST)):
    for cat in fashion200k.CATEGORIES:
      lines = []
      for i, caption in enumerate(table[cat]):
        path = f"women/{cat}/{split}/{i}/{i}_0.jpeg"
        lines.append(f"{path}\t0.{i}\t{caption}")
        paths.append(str(root / path))
      (root / "labels" / f"{cat}_{split}_detect_all.txt").write_text("\n".join(lines) + "\n")
  (root / "test_queries.txt").write_text("\n".join(test_queries) + "\n")
  placeholder_images.write_images(paths)


QUERIES = ["women/dress/test/0/0_0.jpeg women/dress/test/2/2_0.jpeg",    # red -> blue floral
           "women/jacket/test/1/1_0.jpeg women/jacket/test/0/0_0.jpeg",  # brown -> black
           "women/dress/test/3/3_0.jpeg women/dress/test/1/1_0.jpeg"]    # green -> red floral


def config(root, **kw):
  c = ml_collections.ConfigDict(dict(manual_dir=str(root), data_dir=f"{root}_tfds",
                                     skip_missing_images=False,
                                     pairs_per_image=3, dataset_seed=0))
  c.update(kw)
  return c


@pytest.fixture
def root(tmp_path):
  write_fixture(tmp_path, QUERIES)
  return tmp_path


def test_training_pairs_differ_by_one_word(root):
  split = fashion200k.load_fashion200k_split(config(root), "train", log=lambda _: None)
  captions = [c for cat in fashion200k.CATEGORIES for c in TRAIN[cat]]
  captions = [fashion200k.normalise_caption(c) for c in captions]
  modifiable = [i for i, c in enumerate(captions)
                if c not in ("black maxi dress", "wide leg trouser")]
  assert split.num_queries == 3 * len(modifiable)
  assert sorted(set(split.ref_index.tolist())) == modifiable
  for q in range(split.num_queries):
    src, tgt = captions[split.ref_index[q]].split(), captions[split.target_index[q]].split()
    assert len(src) == len(tgt) and sum(a != b for a, b in zip(src, tgt)) == 1
    (a, b), = [(a, b) for a, b in zip(src, tgt) if a != b]
    assert split.texts[q] == f"replace {a} with {b}"
    assert split.image_labels[split.target_index[q]] == split.target_label[q]
  assert "replace 3dotmark1 with 3dotmark2" in split.texts  # google/tirg's normalisation


def test_test_queries_target_sets_and_recall(root):
  split = fashion200k.load_fashion200k_split(config(root), "test", log=lambda _: None)
  assert split.num_images == 10 and split.num_queries == 3
  assert split.texts == ["replace red with blue", "replace brown with black",
                         "replace green with red"]
  red = split.image_labels[0]
  assert split.target_label[2] == red and (split.image_labels == red).sum() == 2
  # Query 2's labelled target is row 1, but row 0 (same caption) is an equally good hit;
  # query 1 points at its own reference (row 5), which must not count.
  emb = np.eye(10, dtype=np.float32)
  query = np.stack([emb[2], 0.9 * emb[5] + 0.1 * emb[4], emb[0]])
  m = retrieval.evaluate_retrieval(query, emb, split.image_labels, split.target_label,
                                   exclude_index=split.ref_index, ks=(1, 10))
  assert m == {"R@1": pytest.approx(100.0), "R@10": pytest.approx(100.0)}
  # Without the exclusion the reference (brown) would be query 1's first result: a miss.
  m = retrieval.evaluate_retrieval(query, emb, split.image_labels, split.target_label, ks=(1,))
  assert m["R@1"] == pytest.approx(200 / 3)


def test_bad_query_line_and_missing_image(root):
  (root / "test_queries.txt").write_text(QUERIES[0] + "\nwomen/dress/test/0/0_0.jpeg\n")
  with pytest.raises(ValueError, match=r"test_queries\.txt:2: expected"):
    fashion200k.load_fashion200k_split(config(root), "test")
  (root / "test_queries.txt").write_text("women/dress/test/0/0_0.jpeg women/nope.jpeg\n")
  with pytest.raises(ValueError, match="'women/nope.jpeg' is not in the test label files"):
    fashion200k.load_fashion200k_split(config(root), "test")
  (root / "test_queries.txt").write_text("\n".join(QUERIES))
  (root / "women/dress/test/2/2_0.jpeg").unlink()
  with pytest.raises(FileNotFoundError, match="women/dress/test/2/2_0.jpeg"):
    fashion200k.load_fashion200k_split(config(root), "test", log=lambda _: None)
  split = fashion200k.load_fashion200k_split(config(root, skip_missing_images=True), "test",
                                             log=lambda _: None)
  assert split.skipped == {"images": 1, "queries": 1} and split.num_queries == 2


def test_different_words_matches_reference_fallback():
  assert fashion200k.different_words("a b c", "a x c") == ("b", "x")
  assert fashion200k.different_words("a b", "b a") == ("b", "a")  # all shared: last words


@pytest.mark.slow
def test_trains_and_evaluates_end_to_end(root, tmp_path):
  """Two TIRG steps with K = B on the fixture, then the Fashion200k evaluation."""
  from cir_jax import train  # pylint: disable=g-import-not-at-top
  from tests import fakes  # pylint: disable=g-import-not-at-top
  c = fakes.tiny_config("tirg", **{"data.name": "fashion200k", "data.manual_dir": str(root),
                                   "data.data_dir": str(tmp_path / "tfds"),
                                   "data.image_size": 16, "loss.name": "batch_classification",
                                   "num_train_steps": 2, "eval.ks": (1, 5)})
  results = train.train_and_evaluate(c, str(tmp_path / "work"))
  assert results["split"] == "fashion200k/test" and results["num_queries"] == 3
  assert set(results["metrics"]) == {"R@1", "R@5"}
  assert "target caption" in results["protocol"] and results["skipped"] == {}
