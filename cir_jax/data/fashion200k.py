"""Fashion200k (Han et al., ICCV 2017) in the TIRG protocol (Vo et al., CVPR 2019, 4.1).

Layout (`data.manual_dir` = the dataset root):

  <manual_dir>/labels/{dress,jacket,pants,skirt,top}_{train,test}_detect_all.txt
      one image per line: <relative image path> \\t <detection score> \\t <caption>
  <manual_dir>/<relative image path>               e.g. women/dresses/.../123_0.jpeg
  <manual_dir>/test_queries.txt                    '<source path> <target path>' per line

Captions are normalised as google/tirg datasets.py does (strip; '.', '?', '&',
'*' spelled out as 'dotmark' ...), so caption identity and word differences
match the reference code.

Test (as google/tirg): the gallery is every test image; each line of
test_queries.txt names a source and a target image; the target SET is every test
image with the target's caption (label = caption id); the source image is
excluded; the text is "replace <source word> with <target word>" where the
words are the first source word not in the target caption and the first target
word not in the source caption. R@{1,10,50}. (The paper averages 10 random
subsets of 3,167 queries; the released code and this loader use the fixed file.)

Train (as google/tirg): two captions are siblings when deleting one word from
each gives the same "parent" caption; an image is modifiable when its caption
has a sibling. The reference draws a fresh random (parent, sibling caption,
target image) per access; a RetrievalSplit is a fixed table, so we draw
`data.pairs_per_image` such samples per modifiable image once, with
`data.dataset_seed`, from the same distribution. Deviation: the reference builds
parents with `str.replace(word, '')`, which also deletes the word inside other
words; we delete the word token, which is what "one word difference" means.
"""
import pathlib

import numpy as np

from cir_jax.data import manual
from cir_jax.data.tables import RetrievalSplit

CATEGORIES = ("dress", "jacket", "pants", "skirt", "top")
SPLITS = ("train", "test")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Fashion200k: download the images and labels/ from https://github.com/xthan/fashion-200k and
test_queries.txt from https://github.com/google/tirg (linked in its README). Set data.manual_dir
to the folder holding labels/, test_queries.txt and the image tree the label files name."""


def normalise_caption(caption: str) -> str:
  """google/tirg's caption post-processing (punctuation that matters spelled out)."""
  return (caption.strip().replace(".", "dotmark").replace("?", "questionmark")
          .replace("&", "andmark").replace("*", "starmark"))


def different_words(source: str, target: str) -> tuple[str, str]:
  """First source word not in the target, first target word not in the source.

  Like the reference's for-loops, when every word is shared the last word is
  used (a for-loop variable keeps its last value).
  """
  s_words, t_words = source.split(), target.split()
  s_word = next((w for w in s_words if w not in t_words), s_words[-1])
  t_word = next((w for w in t_words if w not in s_words), t_words[-1])
  return s_word, t_word


def modification_text(source: str, target: str) -> str:
  s_word, t_word = different_words(source, target)
  return f"replace {s_word} with {t_word}"


def read_labels(manual_dir, split: str) -> tuple[list, list]:
  """(relative image paths, normalised captions) of every label file of `split`."""
  root = pathlib.Path(manual_dir) / "labels"
  paths, captions = [], []
  for cat in CATEGORIES:
    path = root / f"{cat}_{split}_detect_all.txt"
    if not path.is_file():
      raise FileNotFoundError(f"Fashion200k label file {path} not found.\n"
                              + MANUAL_DOWNLOAD_INSTRUCTIONS)
    for n, line in enumerate(path.read_text().splitlines(), 1):
      if not line.strip():
        continue
      parts = line.split("\t")
      if len(parts) < 3 or not parts[0].strip() or not normalise_caption(parts[2]):
        raise ValueError(f"{path}:{n}: expected '<image path>\\t<score>\\t<caption>', "
                         f"got {line!r}")
      paths.append(parts[0].strip())
      captions.append(normalise_caption(parts[2]))
  return paths, captions


def _parents(caption: str) -> set:
  words = caption.split()
  return {" ".join(words[:j] + words[j + 1:]) for j in range(len(words))}


def training_pairs(captions, pairs_per_image: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(source rows, target rows) sampled as google/tirg caption_index_sample_.

  For each modifiable image, `pairs_per_image` times: a random parent of its
  caption that has >= 2 children, a random child caption different from its
  own, a random image with that caption.
  """
  caption_images: dict = {}
  for i, c in enumerate(captions):
    caption_images.setdefault(c, []).append(i)
  children: dict = {}
  for c in caption_images:
    for p in _parents(c):
      children.setdefault(p, set()).add(c)
  children = {p: sorted(cs) for p, cs in children.items() if len(cs) >= 2}
  rng = np.random.default_rng(seed)
  sources, targets = [], []
  for i, c in enumerate(captions):
    parents = sorted(p for p in _parents(c) if p in children)
    if not parents:
      continue  # not modifiable
    for _ in range(pairs_per_image):
      p = parents[rng.integers(len(parents))]
      siblings = [s for s in children[p] if s != c]
      t = siblings[rng.integers(len(siblings))]
      sources.append(i)
      targets.append(caption_images[t][rng.integers(len(caption_images[t]))])
  return np.asarray(sources, np.int64), np.asarray(targets, np.int64)


def read_test_queries(manual_dir, row: dict) -> tuple[np.ndarray, np.ndarray]:
  """(source rows, target rows) of test_queries.txt, checked against the test images."""
  path = pathlib.Path(manual_dir) / "test_queries.txt"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found.\n" + MANUAL_DOWNLOAD_INSTRUCTIONS)
  sources, targets = [], []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    parts = line.split()
    if len(parts) != 2:
      raise ValueError(f"{path}:{n}: expected '<source path> <target path>', got {line!r}")
    for p in parts:
      if p not in row:
        raise ValueError(f"{path}:{n}: image {p!r} is not in the test label files")
    sources.append(row[parts[0]])
    targets.append(row[parts[1]])
  return np.asarray(sources, np.int64), np.asarray(targets, np.int64)


def load_fashion200k_split(data_config, split: str, log=print) -> RetrievalSplit:
  """Builds Fashion200k `split` ('train' or 'test'); labels are caption ids."""
  if split not in SPLITS:
    raise ValueError(f"Fashion200k has no split {split!r}; splits: {list(SPLITS)}")
  if not data_config.manual_dir:
    raise ValueError("data.manual_dir is empty.\n" + MANUAL_DOWNLOAD_INSTRUCTIONS)
  root = pathlib.Path(data_config.manual_dir)
  paths, captions = read_labels(root, split)
  labels, _ = manual.labels_of(captions)
  if split == "train":
    if data_config.pairs_per_image < 1:
      raise ValueError(f"data.pairs_per_image={data_config.pairs_per_image} must be >= 1")
    src, tgt = training_pairs(captions, data_config.pairs_per_image, data_config.dataset_seed)
  else:
    # Duplicated paths resolve to their last row, as the reference's file2imgid dict.
    src, tgt = read_test_queries(root, {p: i for i, p in enumerate(paths)})
  texts = [modification_text(captions[s], captions[t]) for s, t in zip(src, tgt)]
  out = manual.assemble(
      f"fashion200k/{split}", paths, [str(root / p) for p in paths], labels, src, tgt,
      labels[tgt], texts, skip_missing=data_config.skip_missing_images,
      protocol=("Fashion200k (TIRG): gallery = all test images; source excluded; hit = any "
                "image with the target caption"),
      log=log, instructions=MANUAL_DOWNLOAD_INSTRUCTIONS)
  log(f"fashion200k/{split}: {out.num_queries} queries, {out.num_images} images, "
      f"{len(set(captions))} distinct captions")
  return out
