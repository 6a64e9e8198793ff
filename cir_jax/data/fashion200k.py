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

TFDS: `parse_split` is the parser; the `cir_fashion200k` builder (configs
'test' and 'train.p<pairs_per_image>.seed<dataset_seed>') stores its tables once
under data.data_dir and `load_fashion200k_split` reads them from there
(cir_jax.data.manual_tfds; images are not copied, they are read from manual_dir).
"""
import dataclasses
import pathlib
import re

import numpy as np

from cir_jax.data import checks
from cir_jax.data import manual
from cir_jax.data import manual_tfds
from cir_jax.data.tables import RetrievalSplit

CATEGORIES = ("dress", "jacket", "pants", "skirt", "top")
SPLITS = ("train", "test")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Fashion200k: download the images and labels/ from https://github.com/xthan/fashion-200k and
test_queries.txt from https://github.com/google/tirg (linked in its README). Set data.manual_dir
to the folder holding labels/, test_queries.txt and the image tree the label files name."""

_CITATION = """
@inproceedings{han2017automatic,
  title={Automatic Spatially-aware Fashion Concept Discovery},
  author={Han, Xintong and Wu, Zuxuan and Huang, Phoenix X. and Zhang, Xiao and Zhu, Menglong
          and Li, Yuan and Zhao, Yang and Davis, Larry S.},
  booktitle={ICCV},
  year={2017}
}
"""


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


def annotation_files(manual_dir, split: str) -> list:
  """The files `parse_split` reads: the five label files (+ test_queries.txt for test)."""
  root = pathlib.Path(manual_dir)
  files = [root / "labels" / f"{cat}_{split}_detect_all.txt" for cat in CATEGORIES]
  return files + ([root / "test_queries.txt"] if split == "test" else [])


def parse_split(manual_dir, split: str, pairs_per_image: int = 1, seed: int = 0
                ) -> manual_tfds.ParsedSplit:
  """Parses Fashion200k `split` ('train' or 'test') into tables; labels are caption ids.

  Args:
    manual_dir: the dataset root.
    split: 'train' or 'test'.
    pairs_per_image: training pairs drawn per modifiable image (train only).
    seed: seed of those draws (train only).

  Returns:
    ParsedSplit whose image ids and paths are the label files' relative paths.
  """
  if split not in SPLITS:
    raise ValueError(f"Fashion200k has no split {split!r}; splits: {list(SPLITS)}")
  root = pathlib.Path(manual_dir)
  paths, captions = read_labels(root, split)
  labels, _ = manual.labels_of(captions)
  if split == "train":
    if pairs_per_image < 1:
      raise ValueError(f"data.pairs_per_image={pairs_per_image} must be >= 1")
    src, tgt = training_pairs(captions, pairs_per_image, seed)
  else:
    # Duplicated paths resolve to their last row, as the reference's file2imgid dict.
    src, tgt = read_test_queries(root, {p: i for i, p in enumerate(paths)})
  texts = [modification_text(captions[s], captions[t]) for s, t in zip(src, tgt)]
  return manual_tfds.ParsedSplit(
      name=f"fashion200k/{split}", image_ids=paths, image_paths=paths, image_labels=labels,
      ref_index=src, target_index=tgt, target_label=labels[tgt], texts=texts,
      protocol=("Fashion200k (TIRG): gallery = all test images; source excluded; hit = any "
                "image with the target caption"))


@dataclasses.dataclass(eq=False)
class Fashion200kConfig(manual_tfds.ManualConfig):
  """Split and, for train, the pair sampling that fixes the training table."""
  pairs_per_image: int = 1
  seed: int = 0


def make_config(split: str, pairs_per_image: int = 1, seed: int = 0) -> Fashion200kConfig:
  """The config 'test' or 'train.p<pairs_per_image>.seed<seed>'."""
  if split not in SPLITS:
    raise ValueError(f"Fashion200k has no split {split!r}; splits: {list(SPLITS)}")
  if split == "test":
    return Fashion200kConfig(name="test", split="test", description="Fashion200k test queries")
  return Fashion200kConfig(
      name=f"train.{manual_tfds.sampling_name(pairs_per_image, seed)}", split="train",
      pairs_per_image=pairs_per_image, seed=seed,
      description=f"Fashion200k train, {pairs_per_image} pairs per image, seed {seed}")


class Fashion200k(manual_tfds.ManualBuilder):
  """TFDS builder `cir_fashion200k`: configs 'test', 'train.p<n>.seed<s>' (manual_tfds)."""

  name = "cir_fashion200k"
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [make_config("test"), make_config("train")]
  DESCRIPTION = ("Fashion200k (Han et al., ICCV 2017) in the TIRG protocol: one-word caption "
                 "differences as modification texts.")
  HOMEPAGE = "https://github.com/xthan/fashion-200k"
  CITATION = _CITATION

  @classmethod
  def config_from_name(cls, name):
    match = re.fullmatch(rf"train\.{manual_tfds.SAMPLING_PATTERN}", name)
    return None if match is None else make_config("train", *map(int, match.groups()))

  def parse(self, manual_dir):
    config = self.builder_config
    return parse_split(manual_dir, config.split, config.pairs_per_image, config.seed)

  def source_paths(self, manual_dir):
    return annotation_files(manual_dir, self.builder_config.split)


def load_fashion200k_split(data_config, split: str, log=print) -> RetrievalSplit:
  """Builds Fashion200k `split` ('train' or 'test'); labels are caption ids.

  The annotations are parsed once into the `cir_fashion200k/<config>` TFDS
  dataset under data.data_dir (cir_jax.data.manual_tfds); images are read from
  manual_dir. Reads manual_dir, data_dir, skip_missing_images and, for train,
  pairs_per_image and dataset_seed.
  """
  if split not in SPLITS:
    raise ValueError(f"Fashion200k has no split {split!r}; splits: {list(SPLITS)}")
  checks.require_manual_dir(data_config, MANUAL_DOWNLOAD_INSTRUCTIONS)
  config = (make_config(split, data_config.pairs_per_image, data_config.dataset_seed)
            if split == "train" else make_config(split))
  parsed = manual_tfds.load_prepared(Fashion200k, config.name, data_config.get("data_dir"),
                                     data_config.manual_dir, log)
  out = parsed.to_split(data_config.manual_dir, skip_missing=data_config.skip_missing_images,
                        log=log, instructions=MANUAL_DOWNLOAD_INSTRUCTIONS)
  log(f"fashion200k/{split}: {out.num_queries} queries, {out.num_images} images, "
      f"{len(np.unique(parsed.image_labels))} distinct captions")
  return out
