"""MIT-States (Isola et al., CVPR 2015) in the TIRG protocol (Vo et al., CVPR 2019, 4.2).

Layout (`data.manual_dir` = the release's root):

  <manual_dir>/images/<adj> <noun>/*.jpg      e.g. images/ripe tomato/image_123.jpg
  <manual_dir>/compositional-split/{train,test}_pairs.txt   only for data.mit_states_split=
                                              'compositional' ('<adj> <noun>' per line)

As google/tirg datasets.py: folders without a space are ignored, and so are the
'adj <noun>' folders (the release's un-annotated images, adjective literally 'adj').

`data.mit_states_split`:
* 'tirg' (retrieval, Table 2): the 49 nouns of TEST_NOUNS are held out; train
  has the other nouns, test only these, so every test composition is novel.
  Test queries (as the reference): for every test image and every OTHER
  adjective its noun takes in the test split, the text is that target
  adjective and the target set is every test image of '<target adj> <noun>'.
  The reference image is excluded. R@{1,5,10}.
* 'compositional' (classification, Table 3): the (adj, noun) pair split of
  Nagarajan & Grauman 2018 / Misra et al. 2017 that the paper says it uses
  ("the same compositional split as [31, 33]"): train images are those of the
  train pairs, test images those of the (unseen) test pairs. See
  cir_jax/mit_states_classification.py.

Training queries (as the reference's caption_index_sample_): for an image of
noun n, a target adjective drawn uniformly from the adjectives of n in the
split (its own included, as in the reference), a random image of that pair,
text = the target adjective. `data.pairs_per_image` draws per image, fixed
once with `data.dataset_seed` (the reference redraws per access).

TFDS: `parse_split` is the parser; the `cir_mit_states` builder (configs
'<kind>.test' and '<kind>.train.p<pairs_per_image>.seed<dataset_seed>') stores
its tables once under data.data_dir and `load_mit_states_split` reads them from
there (cir_jax.data.manual_tfds; the image folders are its annotation: a change
in their listing prepares again; images are read from manual_dir).
"""
import dataclasses
import os
import pathlib
import re

import numpy as np

from cir_jax.data import checks
from cir_jax.data import manual
from cir_jax.data import manual_tfds
from cir_jax.data.tables import RetrievalSplit

SPLITS = ("train", "test")
SPLIT_KINDS = ("tirg", "compositional")
IMAGE_SUFFIXES = (".jpg", ".jpeg")

# The 49 held-out test nouns, verbatim from google/tirg datasets.py (MITStates.__init__).
TEST_NOUNS = (
    "armor", "bracelet", "bush", "camera", "candy", "castle", "ceramic", "cheese", "clock",
    "clothes", "coffee", "fan", "fig", "fish", "foam", "forest", "fruit", "furniture", "garden",
    "gate", "glass", "horse", "island", "laptop", "lead", "lightning", "mirror", "orange",
    "paint", "persimmon", "plastic", "plate", "potato", "road", "rubber", "sand", "shell", "sky",
    "smoke", "steel", "stream", "table", "tea", "tomato", "vacuum", "wax", "wheel", "window",
    "wool")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
MIT-States: download release_dataset.zip from
http://web.mit.edu/phillipi/Public/states_and_transformations/ and unzip it so that
<manual_dir>/images/<adj> <noun>/*.jpg exist. For data.mit_states_split='compositional' also
copy compositional-split/{train,test}_pairs.txt from the Attributes-as-Operators data
(https://github.com/Tushar-N/attributes-as-operators) into <manual_dir>/compositional-split/."""

_CITATION = """
@inproceedings{isola2015discovering,
  title={Discovering States and Transformations in Image Collections},
  author={Isola, Phillip and Lim, Joseph J. and Adelson, Edward H.},
  booktitle={CVPR},
  year={2015}
}
"""


def read_pairs(path: pathlib.Path) -> set:
  """{(adj, noun)} of a '<adj> <noun>' per line file."""
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found.\n" + MANUAL_DOWNLOAD_INSTRUCTIONS)
  pairs = set()
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if line.strip():
      words = line.split()
      if len(words) != 2:
        raise ValueError(f"{path}:{n}: expected '<adj> <noun>', got {line!r}")
      pairs.add(tuple(words))
  return pairs


def list_images(manual_dir, split: str, kind: str = "tirg") -> list:
  """[(relative path, adj, noun)] of `split`, sorted (folder, file)."""
  if split not in SPLITS:
    raise ValueError(f"MIT-States has no split {split!r}; splits: {list(SPLITS)}")
  if kind not in SPLIT_KINDS:
    raise ValueError(f"data.mit_states_split={kind!r}; valid: {list(SPLIT_KINDS)}")
  root = pathlib.Path(manual_dir)
  images = root / "images"
  if not images.is_dir():
    raise FileNotFoundError(f"{images} not found.\n" + MANUAL_DOWNLOAD_INSTRUCTIONS)
  pairs = (read_pairs(root / "compositional-split" / f"{split}_pairs.txt")
           if kind == "compositional" else None)
  out = []
  for folder in sorted(os.listdir(images)):
    if " " not in folder:
      continue
    words = folder.split()
    if len(words) != 2:
      raise ValueError(f"{images / folder}: folder name must be '<adj> <noun>'")
    adj, noun = words
    if adj == "adj":
      continue
    if kind == "tirg" and (noun in TEST_NOUNS) != (split == "test"):
      continue
    if kind == "compositional" and (adj, noun) not in pairs:
      continue
    for f in sorted(os.listdir(images / folder)):
      if f.startswith("."):
        continue
      if not f.lower().endswith(IMAGE_SUFFIXES):
        raise ValueError(f"{images / folder / f}: not a .jpg image (the release has only jpg)")
      out.append((f"images/{folder}/{f}", adj, noun))
  if not out:
    raise ValueError(f"MIT-States {kind}/{split}: no images under {images}")
  return out


def source_paths(manual_dir, kind: str, split: str) -> list:
  """What `parse_split` reads: the images/ listing (+ the pair file of 'compositional')."""
  root = pathlib.Path(manual_dir)
  pairs = [root / "compositional-split" / f"{split}_pairs.txt"] if kind == "compositional" else []
  return [root / "images"] + pairs


def parse_split(manual_dir, split: str, kind: str = "tirg", pairs_per_image: int = 1,
                seed: int = 0) -> manual_tfds.ParsedSplit:
  """Parses MIT-States `split` of split `kind` into tables; labels are '<adj> <noun>' ids.

  Args:
    manual_dir: the release's root.
    split: 'train' or 'test'.
    kind: data.mit_states_split, 'tirg' or 'compositional'.
    pairs_per_image: training queries drawn per image (train only).
    seed: seed of those draws (train only).

  Returns:
    ParsedSplit whose image ids and paths are 'images/<adj> <noun>/<file>'.
  """
  images = list_images(manual_dir, split, kind)
  classes = [f"{a} {n}" for _, a, n in images]
  labels, class_id = manual.labels_of(classes)
  noun_adjs: dict = {}
  class_rows: dict = {}
  for i, (_, a, n) in enumerate(images):
    noun_adjs.setdefault(n, [])
    if a not in noun_adjs[n]:
      noun_adjs[n].append(a)
    class_rows.setdefault(f"{a} {n}", []).append(i)
  src, tgt_label, texts, tgt_row = [], [], [], []
  if split == "test":
    for i, (_, a, n) in enumerate(images):
      for t in noun_adjs[n]:
        if t != a:
          src.append(i)
          texts.append(t)
          tgt_label.append(class_id[f"{t} {n}"])
          tgt_row.append(class_rows[f"{t} {n}"][0])  # a representative; any of the set is a hit
  else:
    if pairs_per_image < 1:
      raise ValueError(f"data.pairs_per_image={pairs_per_image} must be >= 1")
    rng = np.random.default_rng(seed)
    for i, (_, a, n) in enumerate(images):
      for _ in range(pairs_per_image):
        t = noun_adjs[n][rng.integers(len(noun_adjs[n]))]
        rows = class_rows[f"{t} {n}"]
        src.append(i)
        texts.append(t)
        tgt_label.append(class_id[f"{t} {n}"])
        tgt_row.append(rows[rng.integers(len(rows))])
  if not src:
    raise ValueError(f"MIT-States {kind}/{split}: no queries (every noun has one adjective)")
  paths = [p for p, _, _ in images]
  return manual_tfds.ParsedSplit(
      name=f"mit_states/{kind}/{split}", image_ids=paths, image_paths=paths,
      image_labels=labels, ref_index=np.asarray(src, np.int64),
      target_index=np.asarray(tgt_row, np.int64), target_label=np.asarray(tgt_label, np.int64),
      texts=texts,
      protocol=(f"MIT-States ({kind} split): gallery = all {split} images; reference "
                "excluded; text = target adjective; hit = any image of '<target adj> <noun>'"))


@dataclasses.dataclass(eq=False)
class MITStatesConfig(manual_tfds.ManualConfig):
  """Split kind, split and, for train, the query sampling that fixes the training table."""
  kind: str = "tirg"
  pairs_per_image: int = 1
  seed: int = 0


def make_config(kind: str, split: str, pairs_per_image: int = 1, seed: int = 0
                ) -> MITStatesConfig:
  """The config '<kind>.test' or '<kind>.train.p<pairs_per_image>.seed<seed>'."""
  if kind not in SPLIT_KINDS:
    raise ValueError(f"data.mit_states_split={kind!r}; valid: {list(SPLIT_KINDS)}")
  if split not in SPLITS:
    raise ValueError(f"MIT-States has no split {split!r}; splits: {list(SPLITS)}")
  if split == "test":
    return MITStatesConfig(name=f"{kind}.test", split="test", kind=kind,
                           description=f"MIT-States {kind} test queries")
  return MITStatesConfig(
      name=f"{kind}.train.{manual_tfds.sampling_name(pairs_per_image, seed)}", split="train",
      kind=kind, pairs_per_image=pairs_per_image, seed=seed,
      description=f"MIT-States {kind} train, {pairs_per_image} queries per image, seed {seed}")


class MITStates(manual_tfds.ManualBuilder):
  """TFDS builder `cir_mit_states`: configs '<kind>.test', '<kind>.train.p<n>.seed<s>'."""

  name = "cir_mit_states"
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [make_config(k, s) for k in SPLIT_KINDS for s in ("test", "train")]
  DESCRIPTION = ("MIT-States (Isola et al., CVPR 2015) in the TIRG protocol: the target "
                 "adjective as modification text, held-out nouns at test.")
  HOMEPAGE = "http://web.mit.edu/phillipi/Public/states_and_transformations/"
  CITATION = _CITATION

  @classmethod
  def config_from_name(cls, name):
    match = re.fullmatch(rf"(\w+)\.train\.{manual_tfds.SAMPLING_PATTERN}", name)
    if match is None or match.group(1) not in SPLIT_KINDS:
      return None
    return make_config(match.group(1), "train", int(match.group(2)), int(match.group(3)))

  def parse(self, manual_dir):
    c = self.builder_config
    return parse_split(manual_dir, c.split, c.kind, c.pairs_per_image, c.seed)

  def source_paths(self, manual_dir):
    return source_paths(manual_dir, self.builder_config.kind, self.builder_config.split)


def load_mit_states_split(data_config, split: str, log=print) -> RetrievalSplit:
  """Builds MIT-States `split`; labels are '<adj> <noun>' class ids.

  The listing is parsed once into the `cir_mit_states/<config>` TFDS dataset
  under data.data_dir (cir_jax.data.manual_tfds); images are read from
  manual_dir. Reads manual_dir, data_dir, mit_states_split,
  skip_missing_images and, for train, pairs_per_image and dataset_seed.
  """
  checks.require_manual_dir(data_config, MANUAL_DOWNLOAD_INSTRUCTIONS)
  kind = data_config.mit_states_split
  config = (make_config(kind, split, data_config.pairs_per_image, data_config.dataset_seed)
            if split == "train" else make_config(kind, split))
  parsed = manual_tfds.load_prepared(MITStates, config.name, data_config.get("data_dir"),
                                     data_config.manual_dir, log)
  out = parsed.to_split(data_config.manual_dir, skip_missing=data_config.skip_missing_images,
                        log=log, instructions=MANUAL_DOWNLOAD_INSTRUCTIONS)
  nouns = {pathlib.PurePath(p).parent.name.split()[1] for p in parsed.image_paths}
  log(f"mit_states/{kind}/{split}: {out.num_queries} queries, {out.num_images} images, "
      f"{len(np.unique(parsed.image_labels))} (adj, noun) classes, {len(nouns)} nouns")
  return out


def class_table(split: RetrievalSplit) -> list:
  """'<adj> <noun>' name of every gallery image (from its folder)."""
  return [pathlib.Path(p).parent.name for p in split.image_paths]
