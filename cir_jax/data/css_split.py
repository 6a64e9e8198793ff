"""Turns the CSS TFDS dataset (one example per query) into a RetrievalSplit.

The gallery of a split is every unique image (by id) among its references and
targets; the generator guarantees every image of the split appears in a query.
Both renders are kept: `query_render` picks the reference domain ('3d' for
3D->3D, '2d' for 2D->3D), `target_render` the gallery domain.
"""
import numpy as np
import tensorflow_datasets as tfds

from cir_jax.data import css
from cir_jax.data.tables import RetrievalSplit

RENDERS = ("2d", "3d")


def load_css_split(data_config, split: str, log=print) -> RetrievalSplit:
  """Builds (once, cached in data_config.data_dir) and loads CSS `split` ('train' or 'test')."""
  for field in ("query_render", "target_render"):
    if data_config[field] not in RENDERS:
      raise ValueError(f"data.{field}={data_config[field]!r}; valid renders: {list(RENDERS)}")
  builder = css.build_css(data_config.data_dir, image_size=data_config.image_size,
                          num_scenes=data_config.num_scenes,
                          num_queries=data_config.num_queries, seed=data_config.dataset_seed)
  if split not in builder.info.splits:
    raise ValueError(f"CSS has no split {split!r}; splits: {sorted(builder.info.splits)}")
  images = {r: {} for r in RENDERS}
  labels, queries = {}, []
  for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
    for side in ("ref", "target"):
      image_id = int(ex[f"{side}_id"])
      if image_id not in labels:
        labels[image_id] = int(ex[f"{side}_label"])
        for r in RENDERS:
          images[r][image_id] = ex[f"{side}_image_{r}"]
    queries.append((int(ex["query_id"]), int(ex["ref_id"]), int(ex["target_id"]),
                    int(ex["target_label"]), ex["text"].decode()))
  queries.sort()
  ids = sorted(labels)
  row = {image_id: i for i, image_id in enumerate(ids)}
  stack = {r: np.stack([images[r][i] for i in ids]) for r in RENDERS}
  q = np.asarray([qq[:4] for qq in queries], np.int64)
  log(f"css/{split}: {len(queries)} queries, {len(ids)} gallery images, "
      f"{len(set(labels.values()))} distinct scenes, {data_config.image_size}px")
  return RetrievalSplit(
      name=f"css/{split}",
      images=stack[data_config.target_render],
      query_images=(None if data_config.query_render == data_config.target_render
                    else stack[data_config.query_render]),
      image_labels=np.asarray([labels[i] for i in ids], np.int64),
      image_ids=[str(i) for i in ids],
      ref_index=np.asarray([row[i] for i in q[:, 1]], np.int64),
      target_index=np.asarray([row[i] for i in q[:, 2]], np.int64),
      target_label=q[:, 3],
      texts=[qq[4] for qq in queries],
      query_ids=[str(i) for i in q[:, 0]],
  ).validate()
