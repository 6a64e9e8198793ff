"""TFDS builders of the manual-download datasets: prepared once, equal to the parsers, errors."""
import dataclasses
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cir_jax.data import cirr
from cir_jax.data import fashion200k
from cir_jax.data import fashioniq
from cir_jax.data import mit_states
from cir_jax.data.tables import RetrievalSplit
from tests import placeholder_images
from tests.test_fashion200k import QUERIES as F200K_QUERIES
from tests.test_fashioniq import fiq_dir  # noqa: F401,F811 (a fixture)
from tests.test_fashion200k import write_fixture as write_f200k
from tests.test_mit_states import FOLDERS as MIT_FOLDERS

QUIET = lambda _: None  # pylint: disable=unnecessary-lambda-assignment


def assert_same_split(a: RetrievalSplit, b: RetrievalSplit):
  """Every field equal, arrays with the same dtype."""
  for f in dataclasses.fields(RetrievalSplit):
    x, y = getattr(a, f.name), getattr(b, f.name)
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
      assert np.asarray(x).dtype == np.asarray(y).dtype, f.name
      np.testing.assert_array_equal(x, y, err_msg=f.name)
    else:
      assert x == y, f.name


def data_config(root, data_dir, **overrides):
  c = ml_collections.ConfigDict(dict(
      manual_dir=str(root), data_dir=str(data_dir), skip_missing_images=False,
      category="dress", train_categories=("dress",), caption_join="and",
      image_extensions=("png", "jpg"), pairs_per_image=2, dataset_seed=0,
      mit_states_split="tirg"))
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory, shared_data):
  """The real CIRR annotations in the flat layout (captions/ at the root) + placeholder images."""
  root = tmp_path_factory.mktemp("cirr")
  for sub in ("captions", "image_splits"):
    shutil.copytree(shared_data / "CIRR" / sub, root / sub)
  for split in ("val", "test1"):
    table = cirr.load_image_split(root, split)
    placeholder_images.write_images([str(root / p) for p in table.values()])
  return root


def prepare(name, data_dir, manual_dir):
  builder = tfds.builder(name, data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


@pytest.mark.parametrize("split,counts", [("val", (4181, 2297)), ("test1", (4148, 2315))])
def test_cirr_builder_matches_parser(cirr_root, tmp_path, split, counts):
  builder = prepare(f"cir_cirr/{split}", tmp_path, cirr_root)
  assert isinstance(builder, cirr.Cirr)
  gallery = builder.info.metadata["gallery"]
  assert (builder.info.splits[split].num_examples, len(gallery["image_ids"])) == counts
  table = cirr.load_image_split(cirr_root, split)
  assert gallery["image_paths"] == list(table.values())  # relative, as published
  example = next(iter(tfds.as_numpy(builder.as_dataset(split=split).take(1))))
  assert example["candidates"].shape == (cirr.SUBSET_SIZE,)
  assert example["ref_id"].decode() == gallery["image_ids"][example["ref_index"]]
  direct = cirr.parse_split(cirr_root, split)
  assert (len(direct.texts), len(direct.image_ids)) == counts
  loaded = cirr.load_cirr_split(data_config(cirr_root, tmp_path), split, log=QUIET)
  assert_same_split(loaded, direct.to_split(cirr_root, skip_missing=False, log=QUIET))
  if split == "test1":
    assert (loaded.target_index == -1).all() and cirr.EMPTY_CAPTION in loaded.texts


def test_fashioniq_builder_matches_parser(fiq_dir, tmp_path):  # noqa: F811 (the imported fixture)
  builder = prepare("cir_fashioniq/dress.val.and", tmp_path, fiq_dir)
  assert builder.info.splits["val"].num_examples == 2017
  assert len(builder.info.metadata["gallery"]["image_ids"]) == 3817
  direct = fashioniq.parse_split(fiq_dir, ("dress",), "val")
  assert (len(direct.texts), len(direct.image_ids)) == (2017, 3817)
  cfg = data_config(fiq_dir, tmp_path)
  loaded = fashioniq.load_fashioniq_split(cfg, "val", log=QUIET, check_images=False)
  root = fiq_dir
  expected = direct.to_split(root, skip_missing=False, log=QUIET, check=False,
                             resolve=lambda rel: fashioniq.image_path(root, rel, ("png", "jpg")))
  assert_same_split(loaded, expected)
  assert loaded.image_paths[0] == str(fiq_dir / "images" / f"{loaded.image_ids[0]}.png")


def test_config_names():
  assert tfds.builder("cir_cirr").builder_config.name == "val"  # the default config
  config = fashioniq.FashionIQ.get_builder_config("dress+shirt.train.random_forms")
  assert (config.categories, config.split, config.caption_join) == (
      ("dress", "shirt"), "train", "random_forms")
  # Evaluation text is always the deterministic join: one table serves both requests.
  assert fashioniq.make_config(("toptee",), "val", "random_forms").name == "toptee.val.and"
  with pytest.raises(ValueError, match="FashionIQ category 'coat'"):
    fashioniq.FashionIQ.get_builder_config("coat.val.and")
  with pytest.raises(ValueError, match="BuilderConfig nonsense not found"):
    tfds.builder("cir_fashioniq/nonsense")


@pytest.fixture
def f200k_root(tmp_path):
  root = tmp_path / "f200k"
  write_f200k(root, F200K_QUERIES)
  return root


@pytest.fixture
def mit_root(tmp_path):
  root = tmp_path / "mit"
  placeholder_images.write_images([str(root / "images" / f / f"img_{i}.jpg")
                                   for f, n in MIT_FOLDERS.items() for i in range(n)])
  return root


@pytest.mark.parametrize("split", ["train", "test"])
def test_fashion200k_builder_matches_parser(f200k_root, tmp_path, split):
  cfg = data_config(f200k_root, tmp_path / "tfds")
  loaded = fashion200k.load_fashion200k_split(cfg, split, log=QUIET)
  direct = fashion200k.parse_split(f200k_root, split, pairs_per_image=2, seed=0)
  assert_same_split(loaded, direct.to_split(f200k_root, skip_missing=False, log=QUIET))
  name = "test" if split == "test" else "train.p2.seed0"
  builder = tfds.builder(f"cir_fashion200k/{name}", data_dir=str(tmp_path / "tfds"))
  assert builder.is_prepared() and builder.info.splits[split].num_examples == len(direct.texts)


@pytest.mark.parametrize("split", ["train", "test"])
def test_mit_states_builder_matches_parser(mit_root, tmp_path, split):
  cfg = data_config(mit_root, tmp_path / "tfds")
  loaded = mit_states.load_mit_states_split(cfg, split, log=QUIET)
  direct = mit_states.parse_split(mit_root, split, "tirg", pairs_per_image=2, seed=0)
  assert_same_split(loaded, direct.to_split(mit_root, skip_missing=False, log=QUIET))
  name = "tirg.test" if split == "test" else "tirg.train.p2.seed0"
  assert tfds.builder(f"cir_mit_states/{name}", data_dir=str(tmp_path / "tfds")).is_prepared()


@pytest.mark.parametrize("builder_cls,config", [
    (cirr.Cirr, "val"), (fashioniq.FashionIQ, "dress.val.and"),
    (fashion200k.Fashion200k, "test"), (mit_states.MITStates, "tirg.test")])
def test_missing_manual_dir_prints_the_instructions(tmp_path, builder_cls, config):
  builder = builder_cls(data_dir=str(tmp_path / "tfds"), config=config)
  with pytest.raises(AssertionError, match="does not exist or is empty") as e:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(tmp_path / "nowhere")))
  assert builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS.strip() in str(e.value)
  assert not builder.is_prepared()


def test_loader_without_data_dir_names_the_field(f200k_root):
  with pytest.raises(ValueError, match="data.data_dir is not set"):
    fashion200k.load_fashion200k_split(data_config(f200k_root, ""), "test", log=QUIET)


def test_second_load_does_not_parse(cirr_root, tmp_path, monkeypatch):
  """Prepared once; then, with the annotation files gone and the parser broken, it loads."""
  root = tmp_path / "cirr"
  shutil.copytree(cirr_root, root)
  cfg = data_config(root, tmp_path / "tfds")
  first = cirr.load_cirr_split(cfg, "val", log=QUIET)
  for path in cirr.annotation_files(root, "val"):
    path.rename(path.with_name(path.name + ".archived"))

  def broken(*args):
    raise AssertionError(f"parsed again: {args}")
  monkeypatch.setattr(cirr, "parse_split", broken)
  logs = []
  again = cirr.load_cirr_split(cfg, "val", log=logs.append)
  assert_same_split(again, first)  # images are still checked: they are all there
  assert any("using the tables prepared" in line for line in logs)


def test_changed_annotation_is_prepared_again(f200k_root, tmp_path):
  cfg = data_config(f200k_root, tmp_path / "tfds")
  first = fashion200k.load_fashion200k_split(cfg, "test", log=QUIET)
  assert first.num_queries == 3
  (f200k_root / "test_queries.txt").write_text(F200K_QUERIES[1] + "\n")
  logs = []
  again = fashion200k.load_fashion200k_split(cfg, "test", log=logs.append)
  assert again.texts == ["replace brown with black"]
  assert any("['test_queries.txt'] changed" in line for line in logs)
  # A broken edit fails as the parser says, and names the file and line.
  (f200k_root / "test_queries.txt").write_text("one_path_only\n")
  with pytest.raises(ValueError, match=r"test_queries\.txt:1: expected"):
    fashion200k.load_fashion200k_split(cfg, "test", log=QUIET)


def test_new_image_folder_is_prepared_again(mit_root, tmp_path):
  """MIT-States' annotation is its folder listing: a new folder changes the tables."""
  cfg = data_config(mit_root, tmp_path / "tfds")
  first = mit_states.load_mit_states_split(cfg, "test", log=QUIET)
  placeholder_images.write_images([str(mit_root / "images" / "broken camera" / "img_0.jpg")])
  again = mit_states.load_mit_states_split(cfg, "test", log=QUIET)
  assert "broken camera" in set(mit_states.class_table(again))
  assert again.num_queries > first.num_queries


def test_skip_missing_images_still_applies_after_preparing(cirr_root, tmp_path):
  root = tmp_path / "cirr"
  shutil.copytree(cirr_root, root)
  cfg = data_config(root, tmp_path / "tfds")
  cirr.load_cirr_split(cfg, "val", log=QUIET)  # prepared with every image present
  first = json.loads((root / "captions/cap.rc2.val.json").read_text())[0]
  os.remove(root / cirr.load_image_split(root, "val")[first["reference"]])
  with pytest.raises(FileNotFoundError, match="1 of 2297 images are missing"):
    cirr.load_cirr_split(cfg, "val", log=QUIET)
  cfg.skip_missing_images = True
  split = cirr.load_cirr_split(cfg, "val", log=QUIET)
  assert split.skipped["images"] == 1 and first["reference"] not in split.image_ids


def test_annotations_without_queries_name_the_files(tmp_path):
  root = tmp_path / "cirr"
  (root / "captions").mkdir(parents=True)
  (root / "image_splits").mkdir()
  (root / "captions/cap.rc2.val.json").write_text("[]")
  (root / "image_splits/split.rc2.val.json").write_text('{"a": "./dev/a.png"}')
  with pytest.raises(ValueError, match=r"cirr/val: the annotation files under .* hold no "
                                       r"queries: .*cap\.rc2\.val\.json"):
    cirr.load_cirr_split(data_config(root, tmp_path / "tfds"), "val", log=QUIET)
