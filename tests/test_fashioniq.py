"""FashionIQ from every real annotation file: counts, caption joins, images, aggregation."""
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from cir_jax import evaluate
from cir_jax import sharding
from cir_jax.data import fashioniq
from cir_jax.data import pipeline
from cir_jax.data.vocab import Vocabulary
from tests import placeholder_images

SIZES = {  # (queries, images) per category and split, as published
    ("dress", "train"): (5985, 11452), ("dress", "val"): (2017, 3817),
    ("dress", "test"): (2024, 3818), ("shirt", "train"): (5988, 19036),
    ("shirt", "val"): (2038, 6346), ("shirt", "test"): (2038, 6346),
    ("toptee", "train"): (6027, 16121), ("toptee", "val"): (1961, 5373),
    ("toptee", "test"): (2056, 5374)}


def data_config(root, **overrides):
  c = ml_collections.ConfigDict(dict(
      manual_dir=str(root), data_dir=f"{root}_tfds", category="dress",
      train_categories=("dress",), caption_join="and",
      image_extensions=("png", "jpg"), skip_missing_images=False))
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def fiq_dir(tmp_path_factory, shared_data):
  root = tmp_path_factory.mktemp("fiq")
  for sub in ("captions", "image_splits"):
    shutil.copytree(shared_data / "fashion-iq" / sub, root / sub)
  return root


@pytest.mark.parametrize("category", fashioniq.CATEGORIES)
@pytest.mark.parametrize("split", fashioniq.SPLITS)
def test_every_file_parses_with_published_counts(fiq_dir, category, split):
  cfg = data_config(fiq_dir, category=category, train_categories=(category,))
  out = fashioniq.load_fashioniq_split(cfg, split, log=lambda _: None, check_images=False)
  assert (out.num_queries, out.num_images) == SIZES[(category, split)]
  assert (out.target_index >= 0).all() == (split != "test")
  assert (out.target_index != out.ref_index).all()


def test_dress_val_with_images_and_clip4cir_join(fiq_dir):
  names, queries = fashioniq.load_annotations(fiq_dir, "dress", "val")
  paths = [str(fiq_dir / "images" / f"{n}.{'png' if i % 2 else 'jpg'}")  # both suffixes
           for i, n in enumerate(names)]
  placeholder_images.write_images(paths)
  out = fashioniq.load_fashioniq_split(data_config(fiq_dir), "val", log=lambda _: None)
  assert (out.num_queries, out.num_images) == (2017, 3817)
  assert out.image_paths == paths
  first = json.loads((fiq_dir / "captions/cap.dress.val.json").read_text())[0]
  c1, c2 = first["captions"]
  assert out.texts[0] == f"{c1.strip('.?, ').capitalize()} and {c2.strip('.?, ')}"
  assert out.image_ids[out.ref_index[0]] == first["candidate"]
  assert out.image_ids[out.target_index[0]] == first["target"]
  for p in paths[:5]:
    os.remove(p)
  with pytest.raises(FileNotFoundError, match="5 of 3817 images are missing"):
    fashioniq.load_fashioniq_split(data_config(fiq_dir), "val", log=lambda _: None)
  logs = []
  out = fashioniq.load_fashioniq_split(data_config(fiq_dir, skip_missing_images=True), "val",
                                       log=logs.append)
  gone = set(names[:5])
  dropped = sum(q[0] in gone or q[1] in gone for q in queries)
  assert out.num_images == 3812 and out.skipped == {"images": 5, "queries": dropped}
  assert out.num_queries == 2017 - dropped and any("skipping 5" in line for line in logs)


def test_random_forms_and_union_of_categories(fiq_dir):
  cfg = data_config(fiq_dir, caption_join="random_forms",
                    train_categories=fashioniq.CATEGORIES)
  out = fashioniq.load_fashioniq_split(cfg, "train", log=lambda _: None, check_images=False)
  names, queries = set(), []
  for cat in fashioniq.CATEGORIES:
    cat_names, cat_queries = fashioniq.load_annotations(fiq_dir, cat, "train")
    names.update(cat_names)
    queries += cat_queries
  assert out.num_images == len(names) == 45429  # categories share some images
  # Four forms per pair, minus single-caption forms whose caption is empty.
  assert out.num_queries == sum(2 + sum(bool(c.strip(".?, ")) for c in q[2:]) for q in queries)
  c1, c2 = queries[0][2:]
  assert out.texts[:4] == fashioniq.caption_forms(c1, c2)
  assert out.texts[1].startswith(c2.strip(".?, ").capitalize())
  assert len(set(out.ref_index[:4].tolist())) == 1
  assert out.query_ids[:5] == ["dress/train/0"] * 4 + ["dress/train/1"]
  assert len(set(out.query_groups[:4].tolist())) == 1 and out.query_groups[4] != out.query_groups[0]
  assert len(set(out.query_groups.tolist())) == len(queries) == 18000
  val = fashioniq.load_fashioniq_split(cfg, "val", log=lambda _: None, check_images=False)
  assert val.num_queries == 2017  # evaluation always uses the one deterministic text


def test_bad_category_and_malformed_file(fiq_dir, tmp_path):
  with pytest.raises(ValueError, match="category 'all'"):
    fashioniq.load_fashioniq_split(data_config(fiq_dir, category="all"), "val",
                                   check_images=False)
  shutil.copytree(fiq_dir / "image_splits", tmp_path / "image_splits")
  (tmp_path / "captions").mkdir()
  records = json.loads((fiq_dir / "captions/cap.dress.val.json").read_text())
  records[9]["captions"] = ["only one"]
  (tmp_path / "captions/cap.dress.val.json").write_text(json.dumps(records))
  with pytest.raises(ValueError, match=r"cap\.dress\.val\.json: entry 9 field 'captions'"):
    fashioniq.load_fashioniq_split(data_config(tmp_path), "val", check_images=False)


def test_aggregate_three_categories():
  def result(r10, r50, i10, i50):
    return {"num_queries": 10, "num_gallery": 20, "protocol": "p", "skipped": {"images": 1},
            "metrics": {"R@10": r10, "R@50": r50, "include_ref/R@10": i10,
                        "include_ref/R@50": i50}}
  out = evaluate.aggregate_fashioniq({"dress": result(10, 40, 8, 30),
                                       "shirt": result(20, 50, 18, 40),
                                       "toptee": result(30, 60, 28, 50)})
  m = out["metrics"]
  assert m["avg/R@10"] == 20 and m["avg/R@50"] == 50 and m["avg/mean(R@10,R@50)"] == 35
  assert m["avg/include_ref/R@10"] == pytest.approx(18)
  assert m["avg/include_ref/mean(R@10,R@50)"] == pytest.approx(29)
  assert m["shirt/R@50"] == 50 and out["skipped"] == {"images": 3}
  assert out["num_queries"] == 30


def test_training_draws_one_caption_form_per_triplet(fiq_dir):
  """Batches of 4096 over the real train annotations: never two forms of one triplet;
  over epochs every form is drawn, each about 1/4 of its triplet's draws."""
  cfg = data_config(fiq_dir, caption_join="random_forms",
                    train_categories=fashioniq.CATEGORIES)
  split = fashioniq.load_fashioniq_split(cfg, "train", log=lambda _: None, check_images=False)
  mesh = sharding.make_mesh(jax.devices()[:1])
  vocab = Vocabulary.build(split.texts[:100])
  data = pipeline.TrainPipeline(split, vocab, 8, 4096, mesh, 0, 32)
  assert data.num_examples == 18000 and data.steps_per_epoch() == 4
  groups = split.query_groups
  drawn = np.zeros(split.num_queries, np.int64)
  epoch_q = np.zeros(0, np.int64)
  for step in range(80 * 4):
    q = data.step_indices(step).numpy()
    assert len(np.unique(groups[q])) == len(q) == 4096, step
    if step < 4 * 4:  # within an epoch, too: one query per triplet
      epoch_q = q if step % 4 == 0 else np.concatenate([epoch_q, q])
      assert len(np.unique(groups[epoch_q])) == len(epoch_q)
    drawn[q] += 1
  assert (drawn > 0).all()  # every form of every triplet was used
  first = np.r_[True, groups[1:] != groups[:-1]]
  position = np.arange(len(groups)) - np.maximum.accumulate(np.where(first, np.arange(len(groups)), 0))
  size = np.bincount(groups)[groups]
  share = [drawn[(size == 4) & (position == k)].sum() / drawn[size == 4].sum() for k in range(4)]
  np.testing.assert_allclose(share, 0.25, atol=0.01)
  # Listing the forms as independent queries (the old behaviour) puts forms of one
  # triplet in the same batch: hundreds per batch of 4096.
  split.query_groups = None
  old = pipeline.TrainPipeline(split, vocab, 8, 4096, mesh, 0, 32).step_indices(0).numpy()
  assert len(old) - len(np.unique(groups[old])) > 100
