"""CSS straight from the NumPy generator, without TensorFlow Datasets.

`load_css_split_numpy` returns the same RetrievalSplit as `css_split.load_css_split`
(the TFDS builder stores lossless PNGs of the same renders; tests/test_device_data.py
checks equality), generated in memory each time and never cached. It is what
`config.data.css_source = 'numpy'` selects, for machines without TensorFlow
(tools/device_check.py). Only the renders the split uses are drawn, and a
process keeps the splits it generated (several runs of one sweep share them;
nothing may modify a returned split).
"""
import numpy as np

from cir_jax.data import css_render
from cir_jax.data import css_scenes
from cir_jax.data.tables import RetrievalSplit

RENDERS = ("2d", "3d")
_GENERATED: dict = {}   # (split, sizes, seed, renders) -> RetrievalSplit


def load_css_split_numpy(data_config, split: str, log=print) -> RetrievalSplit:
  """CSS `split` ('train' or 'test') of `data_config` (image_size, num_scenes, num_queries,
  dataset_seed, query_render, target_render), rendered now."""
  for field in ("query_render", "target_render"):
    if data_config[field] not in RENDERS:
      raise ValueError(f"data.{field}={data_config[field]!r}; valid renders: {list(RENDERS)}")
  if split not in css_scenes.SPLITS:
    raise ValueError(f"CSS has no split {split!r}; splits: {sorted(css_scenes.SPLITS)}")
  size = data_config.image_size
  key = (split, size, data_config.num_scenes, data_config.num_queries,
         data_config.dataset_seed, data_config.query_render, data_config.target_render)
  if key not in _GENERATED:
    _GENERATED[key] = _generate(data_config, split, log)
  return _GENERATED[key]


def _generate(data_config, split: str, log) -> RetrievalSplit:
  size = data_config.image_size
  queries, scenes = css_scenes.generate_split(split, data_config.num_scenes,
                                              data_config.num_queries, data_config.dataset_seed)
  ids = sorted(scenes)  # every image of the split is some query's reference or target
  row = {image_id: i for i, image_id in enumerate(ids)}

  def render(which):
    draw = css_render.render_2d if which == "2d" else css_render.render_3d
    return np.stack([draw(scenes[i], size) for i in ids])

  images = render(data_config.target_render)
  query_images = (None if data_config.query_render == data_config.target_render
                  else render(data_config.query_render))
  queries = sorted(queries, key=lambda q: q["query_id"])
  log(f"css/{split}: {len(queries)} queries, {len(ids)} gallery images, "
      f"{len(ids)} distinct scenes, {size}px (NumPy generator)")
  return RetrievalSplit(
      name=f"css/{split}",
      images=images,
      query_images=query_images,
      image_labels=np.asarray(ids, np.int64),   # image_id == scene label
      image_ids=[str(i) for i in ids],
      ref_index=np.asarray([row[q["ref_id"]] for q in queries], np.int64),
      target_index=np.asarray([row[q["target_id"]] for q in queries], np.int64),
      target_label=np.asarray([q["target_label"] for q in queries], np.int64),
      texts=[q["text"] for q in queries],
      query_ids=[str(q["query_id"]) for q in queries],
  ).validate()
