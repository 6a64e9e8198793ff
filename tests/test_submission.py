"""CIRR test1 submission files: written from a fake model, validated on the real annotations."""
import json

import ml_collections
import numpy as np
import pytest

from cir_jax import cirr_submission
from cir_jax.data import cirr


@pytest.fixture(scope="module")
def test1(shared_data, tmp_path_factory):
  root = shared_data / "CIRR"
  data = ml_collections.ConfigDict({"manual_dir": str(root), "skip_missing_images": False,
                                    "data_dir": str(tmp_path_factory.mktemp("tfds"))})
  split = cirr.load_cirr_split(data, "test1", log=lambda _: None, check_images=False)
  return split, cirr.load_annotations(root, "test1"), list(cirr.load_image_split(root, "test1"))


def fake_embeddings(split, seed=0):
  """Random unit gallery vectors; each query points at its reference plus noise, so the
  reference is the best match (it must still never appear in the files)."""
  rng = np.random.default_rng(seed)
  gallery = rng.normal(size=(split.num_images, 32)).astype(np.float32)
  gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
  query = gallery[split.ref_index] + 0.3 * rng.normal(size=(split.num_queries, 32))
  return query.astype(np.float32), gallery


def test_written_files_pass_the_validator(test1, tmp_path):
  split, anns, names = test1
  query, gallery = fake_embeddings(split)
  top, subset = cirr_submission.predict(query, gallery, split)
  recall, recall_subset = cirr_submission.make_submission(split, top, subset)
  paths = cirr_submission.write_submission(tmp_path, recall, recall_subset)
  loaded = [json.loads(paths[k].read_text()) for k in ("recall", "recall_subset")]
  cirr_submission.validate_submission(*loaded, anns, names)
  assert len(loaded[0]) == 4148 + 2 and loaded[0]["version"] == "rc2"
  # The subset ranking is the score order among the members minus the reference.
  q = 7
  members = [n for n in anns[q].members if n != anns[q].reference]
  rows = [names.index(n) for n in members]
  best = [members[i] for i in np.argsort(-(gallery[rows] @ query[q]), kind="stable")[:3]]
  assert loaded[1][str(anns[q].pairid)] == best
  scores = gallery @ query[q]
  scores[split.ref_index[q]] = -np.inf
  assert loaded[0][str(anns[q].pairid)] == [names[i] for i in np.argsort(-scores)[:50]]


def test_validator_accepts_the_official_demo_files(test1, shared_data):
  _, anns, names = test1
  demo = shared_data / "CIRR" / "demo_files"
  cirr_submission.validate_submission(
      json.loads((demo / "test1_pred_ranks_recall.json").read_text()),
      json.loads((demo / "test1_pred_ranks_recall_subset.json").read_text()), anns, names)


@pytest.mark.parametrize("corrupt, message", [
    (lambda r, s, a: r.pop(str(a[0].pairid)), "1 missing"),
    (lambda r, s, a: r[str(a[0].pairid)].pop(), "needs 50 distinct"),
    (lambda r, s, a: r[str(a[0].pairid)].__setitem__(3, a[0].reference), "ranks its reference"),
    (lambda r, s, a: s[str(a[0].pairid)].__setitem__(0, a[0].reference), "ranks its reference"),
    (lambda r, s, a: s[str(a[0].pairid)].__setitem__(
        0, next(n for n in r[str(a[0].pairid)] if n not in a[0].members)), "img_set"),
    (lambda r, s, a: r.__setitem__("metric", "recall_subset"), "'metric'"),
])
def test_validator_rejects(test1, corrupt, message):
  split, anns, names = test1
  query, gallery = fake_embeddings(split, seed=1)
  recall, recall_subset = cirr_submission.make_submission(
      split, *cirr_submission.predict(query, gallery, split))
  corrupt(recall, recall_subset, anns)
  with pytest.raises(ValueError, match=message):
    cirr_submission.validate_submission(recall, recall_subset, anns, names)
