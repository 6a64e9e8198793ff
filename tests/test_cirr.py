"""CIRR from the real val/test1 annotations: layout, counts, errors and the protocol."""
import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from cir_jax import evaluate
from cir_jax import retrieval
from cir_jax import sharding
from cir_jax.data import cirr
from cir_jax.data.vocab import Vocabulary
from configs import common
from tests import placeholder_images


def cirr_config(manual_dir, **overrides):
  c = common.base_config()
  c.data.name = "cirr"
  c.data.manual_dir = str(manual_dir)
  c.data.data_dir = f"{manual_dir}_tfds"  # prepared tables (cir_cirr) beside each copy
  c.data.image_size = 8
  c.data.max_text_len = 40
  c.data.eval_split = "val"
  c.eval.ks = (1, 5, 10, 50)
  c.eval.gallery_variants = ("exclude_ref", "include_ref")
  c.eval.batch_size = 1024   # few pipeline steps: the placeholder images are tiny
  for k, v in overrides.items():
    c.data[k] = v
  return c


@pytest.fixture(scope="module")
def cirr_dir(tmp_path_factory, shared_data):
  """The real annotations (nested as in the CIRR repo: cirr/...) + placeholder images."""
  root = tmp_path_factory.mktemp("cirr")
  for sub in ("captions", "image_splits"):
    shutil.copytree(shared_data / "CIRR" / sub, root / "cirr" / sub)
  for split in ("val", "test1"):
    parsed = cirr.load_cirr_split(cirr_config(root).data, split, log=lambda _: None,
                                  check_images=False)
    placeholder_images.write_images(parsed.image_paths)
  return root


def test_val_counts_and_gallery(cirr_dir):
  split = cirr.load_cirr_split(cirr_config(cirr_dir).data, "val", log=lambda _: None)
  assert (split.num_queries, split.num_images) == (4181, 2297)
  refs = set(split.ref_index.tolist())
  assert len(set(range(split.num_images)) - refs) == 132  # never references, still in the gallery
  np.testing.assert_array_equal(split.target_label, split.target_index)
  assert (split.candidates >= 0).all() and split.candidates.shape == (4181, 5)
  assert not (split.candidates == split.ref_index[:, None]).any()
  assert (split.candidates == split.target_index[:, None]).any(1).all()
  assert (np.diff(split.candidates, axis=1) > 0).all()
  first = json.loads((cirr_dir / "cirr/captions/cap.rc2.val.json").read_text())[0]
  assert split.query_ids[0] == str(first["pairid"]) and split.texts[0] == first["caption"]
  assert split.image_ids[split.ref_index[0]] == first["reference"]
  assert split.image_ids[split.target_index[0]] == first["target_hard"]


def test_test1_has_no_targets(cirr_dir):
  split = cirr.load_cirr_split(cirr_config(cirr_dir).data, "test1", log=lambda _: None)
  assert (split.num_queries, split.num_images) == (4148, 2315)
  assert (split.target_index == -1).all() and (split.target_label == -1).all()
  assert (split.candidates >= 0).all()


def test_missing_images_error_then_skip(cirr_dir, tmp_path):
  root = tmp_path / "cirr"
  shutil.copytree(cirr_dir, root)
  val = cirr.load_annotations(root, "val")
  table = cirr.load_image_split(root, "val")
  gone = [val[0].target_hard, val[1].reference]
  for name in gone:
    os.remove(root / table[name])
  with pytest.raises(FileNotFoundError, match="2 of 2297 images are missing") as e:
    cirr.load_cirr_split(cirr_config(root).data, "val", log=lambda _: None)
  assert table[gone[0]].lstrip("./") in str(e.value)
  logs = []
  split = cirr.load_cirr_split(cirr_config(root, skip_missing_images=True).data, "val",
                               log=logs.append)
  dropped = sum(a.target_hard in gone or a.reference in gone for a in val)
  assert split.num_images == 2295 and split.num_queries == 4181 - dropped
  assert split.skipped["images"] == 2 and split.skipped["queries"] == dropped
  assert any("skipping 2 of 2297" in line for line in logs)
  assert not set(gone) & set(split.image_ids)


def test_broken_image_is_named_at_load_then_skipped(cirr_dir, tmp_path):
  root = tmp_path / "cirr"
  shutil.copytree(cirr_dir, root)
  val = cirr.load_annotations(root, "val")
  path = root / cirr.load_image_split(root, "val")[val[0].reference]
  path.write_bytes(b"this is no image" * 8)  # not a PNG header: caught without decoding
  with pytest.raises(FileNotFoundError, match="1 of 2297 images are missing, unreadable or "
                                              "not images") as e:
    cirr.load_cirr_split(cirr_config(root).data, "val", log=lambda _: None)
  assert str(path).replace("/./", "/") in str(e.value).replace("/./", "/")
  assert "cirr/val" in str(e.value)
  split = cirr.load_cirr_split(cirr_config(root, skip_missing_images=True).data, "val",
                               log=lambda _: None)
  assert split.num_images == 2296 and split.skipped["images"] == 1
  assert val[0].reference not in split.image_ids


def test_malformed_annotation_names_file_and_field(cirr_dir, tmp_path):
  root = tmp_path / "bad"
  shutil.copytree(cirr_dir / "cirr", root / "cirr")
  path = root / "cirr/captions/cap.rc2.val.json"
  records = json.loads(path.read_text())
  del records[3]["img_set"]["members"]
  path.write_text(json.dumps(records))
  with pytest.raises(ValueError, match=r"cap\.rc2\.val\.json: entry 3 img_set has no field "
                                       r"'members'"):
    cirr.load_cirr_split(cirr_config(root).data, "val", check_images=False)


def test_recall_and_subset_hand_computed():
  # Gallery of 6 one-hot images; query q scores image g by emb[g].
  gallery = np.eye(6, dtype=np.float32)
  query = np.array([[.9, .8, .1, .7, 0, 0],     # ref 0 (best, excluded); target 3 -> rank 1
                    [.1, .2, .3, .4, .5, .6]],  # ref 5 (best, excluded); target 1 -> rank 3
                   np.float32)
  cand = np.array([[1, 2, 3, 4, 5], [0, 1, 2, 3, -1]])
  m = retrieval.evaluate_retrieval(
      query, gallery, np.arange(6), np.array([3, 1]), exclude_index=np.array([0, 5]),
      ks=(1, 2, 4), subset_candidates=cand, subset_target=np.array([3, 1]), subset_ks=(1, 2))
  assert m == {"R@1": 0.0, "R@2": 50.0, "R@4": 100.0, "R_subset@1": 0.0,
               "R_subset@2": 50.0}  # q0 subset: 1 (.8) > 3 (.7); q1: 3 > 2 > 1 (.2) > 0


def in_memory(split):
  """The same split with its colour-coded images in memory (skips 6K eager PNG decodes;
  file decoding is the pipeline's concern, the protocol is what is tested here)."""
  codes = np.arange(split.num_images)
  images = np.zeros((split.num_images, 8, 8, 3), np.uint8)
  images[..., 0], images[..., 1] = (codes // 256)[:, None, None], (codes % 256)[:, None, None]
  return dataclasses.replace(split, images=images, image_paths=None)


def test_evaluator_protocol_on_val(cirr_dir):
  config = cirr_config(cirr_dir)
  split = cirr.load_cirr_split(config.data, "val", log=lambda _: None)
  model = placeholder_images.OneHotModel(2304)
  ev = evaluate.Evaluator(config, model, Vocabulary.build(split.texts), sharding.make_mesh(),
                          log=lambda _: None, retrieval_split=in_memory(split))
  out = ev.evaluate({})
  ref, tgt = split.ref_index, split.target_index
  rank_ex = tgt - (ref < tgt)            # gallery order with the reference removed
  rank_in = 1 + tgt - (ref < tgt)        # the reference (score 1) first
  sub_rank = np.argmax(split.candidates == tgt[:, None], axis=1)
  m = out["metrics"]
  for k in (1, 5, 10, 50):
    assert m[f"R@{k}"] == pytest.approx(100 * np.mean(rank_ex < k), abs=1e-4)
    assert m[f"include_ref/R@{k}"] == pytest.approx(100 * np.mean(rank_in < k), abs=1e-4)
  for k in (1, 2, 3):
    assert m[f"R_subset@{k}"] == pytest.approx(100 * np.mean(sub_rank < k), abs=1e-4)
  assert m["(R@5+R_subset@1)/2"] == pytest.approx((m["R@5"] + m["R_subset@1"]) / 2)
  assert m["R@50"] != m["include_ref/R@50"]
  assert out["num_gallery"] == 2297 and out["skipped"] == {} and "exclude_ref" in out["protocol"]


def test_evaluator_test1_gives_topk_only(cirr_dir):
  config = cirr_config(cirr_dir)
  split = cirr.load_cirr_split(config.data, "test1", log=lambda _: None)
  ev = evaluate.Evaluator(config, placeholder_images.OneHotModel(2315),
                          Vocabulary.build(split.texts), sharding.make_mesh(),
                          log=lambda _: None, retrieval_split=in_memory(split))
  out = ev.evaluate({})
  assert out["metrics"] == {} and "no recall" in out["protocol"]
  top = out["topk"]
  assert top.shape == (4148, 50)
  assert not (top == split.ref_index[:, None]).any()
  expected = np.stack([np.delete(np.arange(51), r)[:50] if r < 51 else np.arange(50)
                       for r in split.ref_index])
  np.testing.assert_array_equal(top, expected)
