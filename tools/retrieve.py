"""Retrieves with a trained model: prints the top-k and draws a figure.

Restores the newest checkpoint of `--workdir` exactly as `cir_jax.evaluate`
does, embeds the gallery and the query with `Evaluator` and ranks with
`retrieval.gallery_topk` (the reference image is excluded from its own ranking,
as in the evaluation protocol). The PNG has one row per query: reference image,
text, then the ranked results with their scores; the labelled target(s) are
outlined in green when known.

A query of the config's eval split (its own text, or --text instead):
  python tools/retrieve.py --config configs/tirg_css.py:cpu --workdir runs/demo \
      --query 12 --k 8 --out query12.png
Any reference image and text, against the eval split or a folder of images:
  python tools/retrieve.py --config configs/tirg_css.py:cpu --workdir runs/demo \
      --reference my.png --text "make top-left object red" [--gallery_dir photos/]
N random test queries in one figure (like the papers' qualitative figures):
  python tools/retrieve.py --config configs/tirg_css.py:cpu --workdir runs/demo --random 6
"""
import dataclasses
import os
import pathlib
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
from absl import app
from absl import flags
from PIL import Image, ImageDraw

from cir_jax import evaluate as evaluate_lib
from cir_jax import experiment
from cir_jax import retrieval
from cir_jax.data import registry
from cir_jax.data.tables import RetrievalSplit
from cir_jax.utils import flags as flags_lib
from cir_jax.utils import logging as log_lib

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
CELL = 128          # figure: side of one image cell in pixels
TEXT_WIDTH = 200    # figure: width of the text column
MARGIN = 6
HIT, OTHER = (30, 170, 60), (200, 200, 200)

FLAGS = flags.FLAGS


def define_tool_flags():
  flags.DEFINE_integer("query", None, "Query index of the eval split.")
  flags.DEFINE_string("reference", None, "Reference image file (instead of --query).")
  flags.DEFINE_string("text", None, "Modification text (required with --reference; "
                      "replaces the split's text with --query).")
  flags.DEFINE_integer("random", 0, "Draw this many random queries of the eval split.")
  flags.DEFINE_integer("seed", 0, "Seed of --random.")
  flags.DEFINE_string("gallery_dir", None, "Rank the images of this folder instead of the "
                      "config's eval split gallery.")
  flags.DEFINE_string("split", None, "Split to use instead of config.data.eval_split.")
  flags.DEFINE_integer("k", 5, "Results per query.")
  flags.DEFINE_string("out", None, "PNG to write (default <workdir>/retrieval.png).")


def restore(config, workdir, log):
  """(mesh, vocab, model, variables, step) of the newest checkpoint, as evaluate_workdir."""
  exp, step = experiment.restore_for_evaluation(config, workdir, log)
  return exp.mesh, exp.vocab, exp.model, exp.variables, step


def folder_gallery(directory) -> RetrievalSplit:
  """A query-less RetrievalSplit over the image files of `directory` (sorted by name)."""
  paths = sorted(p for p in pathlib.Path(directory).iterdir()
                 if p.suffix.lower() in IMAGE_SUFFIXES)
  if not paths:
    raise FileNotFoundError(f"--gallery_dir={directory!r} holds no images ({IMAGE_SUFFIXES})")
  return RetrievalSplit(name=f"folder:{directory}", images=None,
                        image_paths=[str(p) for p in paths],
                        image_labels=np.arange(len(paths), dtype=np.int64),
                        image_ids=[p.name for p in paths], ref_index=np.zeros(0, np.int64),
                        target_index=np.zeros(0, np.int64), target_label=np.zeros(0, np.int64),
                        texts=[])


def _load_image(path, size=None) -> np.ndarray:
  """uint8 [H, W, 3] of an image file, optionally resized to `size` (H, W)."""
  try:
    image = Image.open(path).convert("RGB")
  except OSError as e:
    raise ValueError(f"cannot read image {path}: {e}") from e
  if size is not None:
    image = image.resize((size[1], size[0]), Image.BILINEAR)
  return np.asarray(image, np.uint8)


def with_reference(split: RetrievalSplit, path) -> tuple[RetrievalSplit, int]:
  """Appends an outside reference image to the gallery; returns (split, its index).

  It is then embedded like any gallery/query image and excluded from its own
  ranking, so it never appears among the results.
  """
  if split.image_paths is not None:  # already in the gallery: rank the others
    resolved = [pathlib.Path(p).resolve() for p in split.image_paths]
    if pathlib.Path(path).resolve() in resolved:
      return split, resolved.index(pathlib.Path(path).resolve())
  index = split.num_images
  common = dict(image_labels=np.append(split.image_labels, -3),  # never a target
                image_ids=list(split.image_ids) + [f"reference:{pathlib.Path(path).name}"])
  if split.images is not None:
    image = _load_image(path, split.images.shape[1:3])[None]
    common["images"] = np.concatenate([split.images, image])
    if split.query_images is not None:
      common["query_images"] = np.concatenate([split.query_images, image])
  else:
    common["image_paths"] = list(split.image_paths) + [str(path)]
  return dataclasses.replace(split, **common), index


def select_queries(split: RetrievalSplit, indices, text=None, ref_index=None) -> RetrievalSplit:
  """The queries `indices` of `split` (or one new query) over the same gallery."""
  if ref_index is not None:
    return dataclasses.replace(split, ref_index=np.array([ref_index], np.int64),
                               target_index=np.array([-1], np.int64),
                               target_label=np.array([-2], np.int64), texts=[text],
                               candidates=None, query_ids=None).validate()
  bad = [int(i) for i in indices if not 0 <= i < split.num_queries]
  if bad:
    raise ValueError(f"query index {bad[0]} is outside {split.name} "
                     f"({split.num_queries} queries)")
  texts = [text if text else split.texts[i] for i in indices]
  return dataclasses.replace(
      split, ref_index=np.asarray(split.ref_index)[indices],
      target_index=np.asarray(split.target_index)[indices],
      target_label=np.asarray(split.target_label)[indices], texts=texts, candidates=None,
      query_ids=[str(i) for i in indices]).validate()


def rank(evaluator: evaluate_lib.Evaluator, variables, k: int):
  """Top-k of every query of `evaluator.split`: (scores [Q, k], gallery ids [Q, k])."""
  split = evaluator.split
  gallery = evaluator.embed_gallery(variables)
  queries = evaluator.embed_queries(variables)
  exclude = np.full(queries.shape[0], -1, np.int64)
  exclude[:split.num_queries] = split.ref_index
  k = min(k, split.num_images - 1)
  scores, top = retrieval.gallery_topk(
      queries, gallery, k, evaluator.mesh, exclude_index=exclude,
      gallery_valid=np.arange(gallery.shape[0]) < split.num_images,
      block_size=evaluator.config.eval.block_size)
  scores, top = jax.device_get((scores, top))
  return np.asarray(scores)[:split.num_queries], np.asarray(top)[:split.num_queries]


def _gallery_image(split: RetrievalSplit, g: int, query_side=False) -> Image.Image:
  if split.images is not None:
    table = split.query_images if query_side and split.query_images is not None else split.images
    return Image.fromarray(table[g])
  return Image.fromarray(_load_image(split.image_paths[g]))


def _wrap(text: str, width: int) -> list[str]:
  lines, line = [], ""
  for word in text.split():
    if line and len(line) + 1 + len(word) > width:
      lines.append(line)
      line = word
    else:
      line = f"{line} {word}".strip()
  return lines + [line]


def draw_figure(split: RetrievalSplit, scores, top, path):
  """Writes the PNG: per query a row [reference | text | k results (score, target outlined)]."""
  num_rows, k = top.shape
  width = MARGIN + (CELL + MARGIN) * (k + 1) + TEXT_WIDTH + MARGIN
  height = MARGIN + (CELL + 2 * 14 + MARGIN) * num_rows
  canvas = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(canvas)
  labels = np.asarray(split.image_labels)
  for q in range(num_rows):
    y = MARGIN + q * (CELL + 2 * 14 + MARGIN)
    ref = int(split.ref_index[q])
    canvas.paste(_gallery_image(split, ref, query_side=True).resize((CELL, CELL)), (MARGIN, y))
    draw.text((MARGIN, y + CELL + 2), "reference", fill="black")
    x_text = MARGIN + CELL + MARGIN
    for i, line in enumerate(_wrap(split.texts[q], TEXT_WIDTH // 7)[:CELL // 12]):
      draw.text((x_text, y + 4 + 12 * i), line, fill="black")
    for r in range(k):
      g = int(top[q, r])
      x = x_text + TEXT_WIDTH + MARGIN + r * (CELL + MARGIN)
      if g < 0:
        continue
      canvas.paste(_gallery_image(split, g).resize((CELL, CELL)), (x, y))
      hit = labels[g] == split.target_label[q]
      draw.rectangle([x - 3, y - 3, x + CELL + 2, y + CELL + 2], outline=HIT if hit else OTHER,
                     width=4 if hit else 1)
      draw.text((x, y + CELL + 2), f"#{r + 1}  s={scores[q, r]:.3f}", fill="black")
      draw.text((x, y + CELL + 14), str(split.image_ids[g])[:CELL // 7], fill="gray")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  canvas.save(path)
  return path


def run(config, workdir, *, query=None, reference=None, text=None, random=0, seed=0,
        gallery_dir=None, split=None, k=5, out=None, log=print):
  """Restores, ranks and draws; returns (split of the drawn queries, scores, top, png path)."""
  if (query is not None) + (reference is not None) + (random > 0) != 1:
    raise ValueError("give exactly one of --query, --reference, --random")
  if reference is not None and not text:
    raise ValueError("--reference needs --text")
  if gallery_dir is not None and reference is None:
    raise ValueError("--gallery_dir needs --reference (a folder has no queries)")
  mesh, vocab, model, variables, step = restore(config, workdir, log)
  log(f"restored {workdir} at step {step}")
  if gallery_dir is not None:
    base = folder_gallery(gallery_dir)
  else:
    base = registry.load_split(config.data, split or config.data.eval_split, log=log)
  if reference is not None:
    base, ref_index = with_reference(base, reference)
    queries = select_queries(base, None, text=text, ref_index=ref_index)
  else:
    indices = ([query] if random == 0 else
               np.random.default_rng(seed).choice(base.num_queries, min(random, base.num_queries),
                                                  replace=False).tolist())
    queries = select_queries(base, indices, text=text)
  evaluator = evaluate_lib.Evaluator(config, model, vocab, mesh, log=log,
                                     retrieval_split=queries)
  scores, top = rank(evaluator, variables, k)
  for q in range(queries.num_queries):
    ref = queries.ref_index[q]
    name = f"query {queries.query_ids[q]}" if queries.query_ids else "query"
    print(f"{name}: reference {queries.image_ids[ref]} + {queries.texts[q]!r}")
    for r, g in enumerate(top[q]):
      hit = " <- target" if queries.image_labels[g] == queries.target_label[q] else ""
      print(f"  {r + 1:3d}. {queries.image_ids[g]}  score {scores[q, r]:.4f}{hit}")
  path = draw_figure(queries, scores, top, out or pathlib.Path(workdir) / "retrieval.png")
  print(f"wrote {path}")
  return queries, scores, top, path


def main(argv):
  del argv
  run(FLAGS.config, FLAGS.workdir, query=FLAGS.query, reference=FLAGS.reference,
      text=FLAGS.text, random=FLAGS.random, seed=FLAGS.seed, gallery_dir=FLAGS.gallery_dir,
      split=FLAGS.split, k=FLAGS.k, out=FLAGS.out, log=log_lib.Logger(FLAGS.workdir))


if __name__ == "__main__":
  flags_lib.define_flags()
  define_tool_flags()
  app.run(main)
