"""Tests of the CSS generator: templates, compositional split, renders, TFDS builder.

Texts are parsed back here with this file's own regular expressions and the
target scene is recomputed from the parse, so a template whose words and effect
disagree fails. The TFDS tests build a tiny config (32 px, 20 scenes, 50 queries).
"""
import pathlib
import re
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from cir_jax.data import css
from cir_jax.data import css_render
from cir_jax.data import css_scenes

TINY = dict(image_size=32, num_scenes=20, num_queries=50, seed=0)

# CLEVR CoGenT, written out independently of css_scenes.SPLIT_COLORS.
_A_COLORS = {"gray", "blue", "brown", "yellow"}
_B_COLORS = {"red", "green", "purple", "cyan"}
ONLY_IN = {
    "train": {("cube", c) for c in _A_COLORS} | {("cylinder", c) for c in _B_COLORS},
    "test": {("cube", c) for c in _B_COLORS} | {("cylinder", c) for c in _A_COLORS},
}

_P = "|".join(css_scenes.POSITIONS)
_C = "|".join(css_scenes.COLORS)
_SH = "|".join(css_scenes.SHAPES)
_SZ = "small|large"
_ADD = re.compile(rf"add(?: (?P<size>{_SZ}))?(?: (?P<color>{_C}))? (?P<noun>{_SH}|object)"
                  rf"(?: to (?P<cell>{_P}))?")
_SELECTOR = (rf"(?:(?P<cell>{_P}) object|(?:(?P<size>{_SZ}) )?(?:(?P<color>{_C}) )?"
             rf"(?P<noun>{_SH}|object)(?P<plural>s?))")
_REMOVE = re.compile(rf"remove {_SELECTOR}")
_CHANGE = re.compile(rf"make {_SELECTOR} (?P<value>{_C}|{_SZ})")


def _named(scene):
  """Scene as a set of word tuples (position, colour, shape, size)."""
  return {(css_scenes.POSITIONS[o.cell], css_scenes.COLORS[o.color],
           css_scenes.SHAPES[o.shape], css_scenes.SIZES[o.size]) for o in scene}


def _spec(match):
  """The attributes a parsed phrase names, as {field index: word}."""
  spec = {0: match["cell"], 1: match["color"], 3: match["size"]}
  if match["noun"] not in (None, "object"):
    spec[2] = match["noun"]
  return {k: v for k, v in spec.items() if v is not None}


def _matches(obj, spec):
  return all(obj[k] == v for k, v in spec.items())


def _check_query(template, text, ref, target):
  """Asserts `target` is `ref` modified exactly as `text` says."""
  ref, target = _named(ref), _named(target)
  if m := _ADD.fullmatch(text):
    assert template == "add"
    added = target - ref
    assert ref < target and len(added) == 1, (text, ref, target)
    (new,) = added
    assert new[0] not in {o[0] for o in ref}, "added to an occupied cell"
    assert _matches(new, _spec(m)), (text, new)
  elif m := _REMOVE.fullmatch(text):
    assert template == "remove"
    spec = _spec(m)
    assert spec, text
    matched = {o for o in ref if _matches(o, spec)}
    assert matched, f"{text!r} matches nothing in {ref}"
    assert target == ref - matched, (text, ref, target)
    assert (m["plural"] == "s") == (len(matched) > 1), (text, matched)
  elif m := _CHANGE.fullmatch(text):
    assert template == "change"
    spec = _spec(m)
    assert spec, text
    field = 1 if m["value"] in css_scenes.COLORS else 3
    matched = {o for o in ref if _matches(o, spec)}
    assert matched, f"{text!r} matches nothing in {ref}"
    changed = {o[:field] + (m["value"],) + o[field + 1:] for o in matched}
    assert target == (ref - matched) | changed, (text, ref, target)
    assert target != ref, f"{text!r} changes nothing"
    assert (m["plural"] == "s") == (len(matched) > 1), (text, matched)
  else:
    pytest.fail(f"text {text!r} fits no template")


@pytest.fixture(scope="module", params=css_scenes.SPLITS)
def split_data(request):
  split = request.param
  queries, scenes = css_scenes.generate_split(split, num_scenes=60, num_queries=900, seed=3)
  return split, queries, scenes


def test_templates_do_what_the_text_says(split_data):
  _, queries, scenes = split_data
  assert {q["template"] for q in queries} == set(css_scenes.TEMPLATES)
  for q in queries:
    assert re.fullmatch(r"[a-z]+(?:[ -][a-z]+)*", q["text"]), q["text"]
    _check_query(q["template"], q["text"], scenes[q["ref_id"]], scenes[q["target_id"]])


def test_compositional_split_holds_for_refs_and_targets(split_data):
  split, queries, scenes = split_data
  other = "test" if split == "train" else "train"
  used = {(css_scenes.SHAPES[o.shape], css_scenes.COLORS[o.color])
          for q in queries for side in ("ref_id", "target_id") for o in scenes[q[side]]}
  assert not used & ONLY_IN[other], f"{split} uses {other}-only combinations"
  assert used & ONLY_IN[split], "the split's own combinations never appear"
  # Recolouring is where a forbidden combination could slip in: it must happen.
  assert any(re.fullmatch(rf"make .* ({_C})", q["text"]) for q in queries)


def test_cogent_partition_is_disjoint():
  train, test = (css_scenes.allowed_combinations(s) for s in css_scenes.SPLITS)
  sphere = css_scenes.SHAPES.index("sphere")
  assert train[sphere].all() and test[sphere].all()
  others = np.delete(np.arange(len(css_scenes.SHAPES)), sphere)
  assert not (train[others] & test[others]).any()
  assert (train[others] | test[others]).all()


def test_identity_and_gallery_coverage(split_data):
  _, queries, scenes = split_data
  keys = list(scenes.values())
  assert len(set(keys)) == len(keys), "two ids for one scene (ids are per distinct scene)"
  for q in queries:
    assert q["ref_label"] == q["ref_id"] and q["target_label"] == q["target_id"]
    assert css_scenes.MIN_OBJECTS <= len(scenes[q["ref_id"]]) <= css_scenes.MAX_OBJECTS
  used = {q["ref_id"] for q in queries} | {q["target_id"] for q in queries}
  assert used == set(scenes), "an image of the split is in no query"
  assert [q["query_id"] for q in queries] == list(range(len(queries)))


def test_every_reference_gets_a_query_even_when_queries_are_few():
  queries, scenes = css_scenes.generate_split("train", num_scenes=30, num_queries=30, seed=1)
  refs = {q["ref_id"] for q in queries}
  targets = {q["target_id"] for q in queries}
  assert refs | targets == set(scenes)
  with pytest.raises(ValueError, match="num_queries"):
    css_scenes.generate_split("train", num_scenes=30, num_queries=29, seed=1)


def test_generation_is_deterministic_and_seed_dependent():
  a = css_scenes.generate_split("test", 40, 200, seed=7)
  b = css_scenes.generate_split("test", 40, 200, seed=7)
  c = css_scenes.generate_split("test", 40, 200, seed=8)
  assert a == b
  assert [q["text"] for q in a[0]] != [q["text"] for q in c[0]]
  assert a[1] != c[1]
  train = css_scenes.generate_split("train", 40, 200, seed=7)
  assert train[1] != a[1], "splits share their random stream"


def _best_palette_colour(pixel):
  """Palette index whose brightness-scaled colour fits `pixel` best, and the scale."""
  p = pixel.astype(np.float64)
  scale = css_render.PALETTE @ p / np.sum(css_render.PALETTE ** 2, -1)
  residual = np.abs(p - scale[:, None] * css_render.PALETTE).max(-1)
  best = int(np.argmin(residual))
  return best, scale[best], residual[best]


@pytest.mark.parametrize("size", [32, 64])
def test_2d_and_3d_renders_show_the_same_objects(size):
  rng = np.random.default_rng(0)
  empty_3d = css_render.background_3d(size)
  for _ in range(40):
    scene = css_scenes.random_scene(rng, "train")
    im2, im3 = css_render.render_2d(scene, size), css_render.render_3d(scene, size)
    assert im2.shape == im3.shape == (size, size, 3) and im2.dtype == im3.dtype == np.uint8
    for obj in scene:
      np.testing.assert_allclose(im2[css_render.anchor_2d(obj, size)],
                                 css_render.PALETTE[obj.color], atol=1)
      r, c = css_render.anchor_3d(obj, size)
      # Same column third as in 2D (rows overlap under perspective: ordered below).
      assert int(3 * c / size) == obj.cell % 3, (obj, c)
      best, scale, residual = _best_palette_colour(im3[r, c])
      assert best == obj.color and 0.3 < scale < 1.3 and residual < 12, (obj, im3[r, c])
      assert np.abs(im3[r, c].astype(int) - empty_3d[r, c]).max() > 10
      without = tuple(o for o in scene if o != obj)
      assert not np.array_equal(css_render.render_3d(without, size)[r, c], im3[r, c])
    rows = [(o.cell // 3, css_render.anchor_3d(o, size)[0]) for o in scene]
    assert all(ya < yb for ra, ya in rows for rb, yb in rows if ra < rb), "far rows not higher"
    occupied = {css_render.anchor_2d(o, size) for o in scene}
    for cell in set(range(9)) - {o.cell for o in scene}:
      centre = css_render.anchor_2d(css_scenes.Obj(cell, 0, 0, 0), size)
      assert centre not in occupied
      np.testing.assert_array_equal(im2[centre], css_render.BACKGROUND_2D)


def test_3d_perspective_far_rows_are_higher_and_smaller():
  size = 64
  rows = [css_render.anchor_3d(css_scenes.Obj(3 * r + 1, 0, 0, 1), size)[0] for r in range(3)]
  assert rows[0] < rows[1] < rows[2]
  area = []
  for row in range(3):
    scene = (css_scenes.Obj(3 * row + 1, 1, 1, 1),)
    diff = css_render.render_3d(scene, size) != css_render.background_3d(size)
    area.append(diff.any(-1).sum())
  assert area[0] < area[1] < area[2]
  cols = [css_render.anchor_3d(css_scenes.Obj(3 + c, 0, 0, 1), size)[1] for c in range(3)]
  assert cols[0] < cols[1] < cols[2]


def test_empty_scene_is_plain_background():
  im2 = css_render.render_2d((), 48)
  assert (im2 == im2[0, 0]).all()
  np.testing.assert_array_equal(im2[0, 0], css_render.BACKGROUND_2D)
  np.testing.assert_array_equal(css_render.render_3d((), 48), css_render.background_3d(48))


def test_renders_are_deterministic_and_order_free():
  scene = css_scenes.make_scene([(4, 1, 0, 1), (0, 2, 1, 0), (8, 7, 2, 1)])
  other = css_scenes.make_scene([(2, 3, 1, 1)])
  first = css_render.render_3d(scene, 64).tobytes()
  css_render.render_3d(other, 64)
  assert css_render.render_3d(scene, 64).tobytes() == first
  assert css_render.render_2d(scene, 64).tobytes() == css_render.render_2d(scene, 64).tobytes()
  with pytest.raises(ValueError, match="cells"):
    css_scenes.make_scene([(4, 1, 0, 1), (4, 2, 1, 0)])


@pytest.fixture(scope="module")
def tiny_builder(tmp_path_factory):
  return css.build_css(tmp_path_factory.mktemp("tfds"), **TINY)


def test_tfds_builder_examples_match_the_generator(tiny_builder):
  assert tiny_builder.builder_config.name == "img32_s20_q50_seed0"
  assert set(tiny_builder.info.splits) == {"train", "test"}
  size = TINY["image_size"]
  for split in css_scenes.SPLITS:
    queries, scenes = css_scenes.generate_split(split, TINY["num_scenes"], TINY["num_queries"],
                                                TINY["seed"])
    examples = list(tfds.as_numpy(tiny_builder.as_dataset(split=split)))
    assert len(examples) == tiny_builder.info.splits[split].num_examples == TINY["num_queries"]
    seen = set()
    for ex in examples:
      q = queries[int(ex["query_id"])]
      for key in ("ref_id", "target_id", "ref_label", "target_label"):
        assert ex[key].dtype == np.int64 and int(ex[key]) == q[key]
      assert ex["text"].decode() == q["text"] and q["text"]
      assert css_scenes.TEMPLATES[int(ex["template"])] == q["template"]
      for side in ("ref", "target"):
        scene = scenes[q[f"{side}_id"]]
        for render, draw in (("2d", css_render.render_2d), ("3d", css_render.render_3d)):
          image = ex[f"{side}_image_{render}"]
          assert image.shape == (size, size, 3) and image.dtype == np.uint8
          np.testing.assert_array_equal(image, draw(scene, size))  # PNG is lossless
        seen.add(q[f"{side}_id"])
    assert seen == set(scenes), "some gallery image appears in no example"


def test_tfds_config_from_name_and_bad_parameters(tiny_builder):
  again = tfds.builder("css/img32_s20_q50_seed0", data_dir=tiny_builder.data_dir_root)
  assert again.info.splits["test"].num_examples == TINY["num_queries"]
  assert css.CSS.get_builder_config("img64").num_queries == 16000
  assert css.CSS.get_builder_config("img48_s5_q9_seed2").image_size == 48
  with pytest.raises(ValueError, match="num_queries"):
    css.build_css(tiny_builder.data_dir_root, image_size=32, num_scenes=10, num_queries=5)


def _records(path):
  """The split file's examples, in file order, serialised with sorted map keys."""
  return [tf.train.Example.FromString(r.numpy()).SerializeToString(deterministic=True)
          for r in tf.data.TFRecordDataset(str(path))]


def test_tfds_build_is_deterministic(tiny_builder, tmp_path):
  # TFDS serialises tf.train.Example without `deterministic=True`, so the order
  # of feature-map entries (not their content) may vary between processes; the
  # examples, their order and the PNG bytes are compared here.
  rebuilt = css.build_css(tmp_path, **TINY)
  files = sorted(p.name for p in pathlib.Path(tiny_builder.data_dir).glob("*.tfrecord*"))
  assert len(files) == 2
  for name in files:
    first = _records(pathlib.Path(tiny_builder.data_dir) / name)
    assert len(first) == TINY["num_queries"]
    assert _records(pathlib.Path(rebuilt.data_dir) / name) == first, name


def test_default_size_generation_time():
  """The paper's sizes: checks coverage and prints timings (not asserted: shared host)."""
  start = time.perf_counter()
  queries, scenes = css_scenes.generate_split("train", 1000, 16000, seed=0)
  generate_s = time.perf_counter() - start
  assert len(queries) == 16000 and {q["ref_id"] for q in queries} >= set(range(1, 10))
  assert {q["ref_id"] for q in queries} | {q["target_id"] for q in queries} == set(scenes)
  sample = list(scenes.values())[:300]
  rates = {}
  for size in (64, 128):
    for name, draw in (("2d", css_render.render_2d), ("3d", css_render.render_3d)):
      draw(sample[0], size)  # fills the sprite cache
      start = time.perf_counter()
      for scene in sample:
        draw(scene, size)
      rates[f"{name}@{size}"] = len(sample) / (time.perf_counter() - start)
  print(f"\nCSS train split (1000 scenes, 16000 queries): {generate_s:.2f} s, "
        f"{len(scenes)} images; renders/s: "
        + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()))
