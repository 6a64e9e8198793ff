"""Generates the synthetic CSS dataset (TIRG paper, section 4.3) as TFDS files.

  python tools/make_css.py --data_dir data_cache                      # paper sizes, 64 px
  python tools/make_css.py --data_dir data_cache --image_size 128
  python tools/make_css.py --data_dir /tmp/css --num_scenes 20 --num_queries 50 --image_size 32

Files go to <data_dir>/css/<config>/1.0.0 (config 'img64' for the paper's sizes,
else 'img{S}_s{scenes}_q{queries}_seed{seed}'); an existing dataset is reused.
Prints where the data went, the time it took, its size on disk, per split the
number of queries, gallery images and distinct scenes, and one text per template.
"""
import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from cir_jax.data import css  # pylint: disable=g-import-not-at-top
from cir_jax.data import css_scenes  # pylint: disable=g-import-not-at-top

_IMAGES = ("ref_image_2d", "ref_image_3d", "target_image_2d", "target_image_3d")


def _disk_size(path) -> int:
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def _summarise(builder, split):
  """Reads a split back (images left encoded) and prints its counts and sample texts."""
  # Images are not decoded: the summary needs only ids, labels and texts.
  decoders = {name: tfds.decode.SkipDecoding() for name in _IMAGES}
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  labels, examples, num_queries = {}, collections.defaultdict(list), 0
  for ex in tfds.as_numpy(ds.map(lambda ex: {k: v for k, v in ex.items() if k not in _IMAGES})):
    num_queries += 1
    labels[int(ex["ref_id"])] = int(ex["ref_label"])
    labels[int(ex["target_id"])] = int(ex["target_label"])
    template = css_scenes.TEMPLATES[int(ex["template"])]
    if len(examples[template]) < 2:
      examples[template].append(ex["text"].decode())
  print(f"  {split}: {num_queries} queries, {len(labels)} gallery images (refs + targets), "
        f"{len(set(labels.values()))} distinct scenes")
  for template in css_scenes.TEMPLATES:
    print(f"    {template:6s} e.g. " + " | ".join(repr(t) for t in examples[template]))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--data_dir", required=True, help="TFDS data directory")
  parser.add_argument("--image_size", type=int, default=64, help="render side in pixels")
  parser.add_argument("--num_scenes", type=int, default=css.DEFAULT_NUM_SCENES,
                      help="reference scenes per split")
  parser.add_argument("--num_queries", type=int, default=css.DEFAULT_NUM_QUERIES,
                      help="queries per split (>= num_scenes)")
  parser.add_argument("--seed", type=int, default=css.DEFAULT_SEED, help="generation seed")
  args = parser.parse_args(argv)

  name = css.config_name(args.image_size, args.num_scenes, args.num_queries, args.seed)
  print(f"css/{name}: {args.num_scenes} reference scenes and {args.num_queries} queries per "
        f"split, {args.image_size}px, seed {args.seed} -> {args.data_dir}", flush=True)
  start = time.perf_counter()
  builder = css.build_css(args.data_dir, image_size=args.image_size, num_scenes=args.num_scenes,
                          num_queries=args.num_queries, seed=args.seed)
  elapsed = time.perf_counter() - start
  size_mb = _disk_size(builder.data_dir) / 2**20
  print(f"css/{name}: ready in {elapsed:.1f} s at {builder.data_dir} ({size_mb:.1f} MiB)")
  for split in css_scenes.SPLITS:
    _summarise(builder, split)


if __name__ == "__main__":
  main()
