"""FashionIQ (Wu et al., CVPR 2021) from its published layout -> RetrievalSplit.

Layout (`data.manual_dir` points at its root):

  <manual_dir>/captions/cap.{dress,shirt,toptee}.{train,val,test}.json
  <manual_dir>/image_splits/split.{dress,shirt,toptee}.{train,val,test}.json
  <manual_dir>/images/<asin>.png   (or .jpg; `data.image_extensions` lists the suffixes tried)

Protocol (as SSN, which follows CLIP4Cir / Baldrati et al. 2022):
* one category at a time (`data.category`), its val split; gallery = every
  image of split.<category>.val.json (dress 3,817, shirt 6,346, toptee 5,373);
* the two relative captions joined into one text. CLIP4Cir's validation
  (src/validate.py) strips '.?, ' from both ends of each caption, capitalises
  the first and writes "<C1> and <c2>": `data.caption_join='and'` (default).
  `'random_forms'` (training only) reproduces CLIP4Cir's randomised training
  captions (utils.generate_randomized_fiq_caption: c1 and c2 / c2 and c1 / c1
  / c2, each with probability 1/4, drawn anew for each triplet each time it is
  batched): the forms are listed as queries that share their triplet's
  `query_ids` ('<category>/<split>/<entry>') and `query_groups`, and training
  draws ONE form per triplet per epoch (cir_jax.data.pipeline), so an epoch
  has one query per triplet and no batch holds two forms of one triplet
  (they would be each other's false negatives);
* R@10 and R@50 per category, their averages over the three categories and
  the mean of the two averages (`cir_jax.evaluate.FashionIQEvaluator`);
* CLIP4Cir (hence SSN) does NOT remove the reference image from the ranking;
  TIRG-family code does. Both variants are reported (eval.gallery_variants),
  each metric key names its variant.

Training uses `data.train_categories` (default all three, as CLIP4Cir): the
union of their train images and queries. test has no targets (not scored here).
About 4% of the original image links are dead: use data.skip_missing_images.

TFDS: `parse_split` is the parser; the `cir_fashioniq` builder (configs
'<categories>.<split>.<join>', e.g. 'dress.val.and',
'dress+shirt+toptee.train.random_forms') stores its tables once under
data.data_dir and `load_fashioniq_split` reads them from there
(cir_jax.data.manual_tfds; images stay in manual_dir, their suffix is found at
load time from data.image_extensions).
"""
import dataclasses
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from cir_jax.data import checks
from cir_jax.data import manual
from cir_jax.data import manual_tfds
from cir_jax.data.tables import RetrievalSplit

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")
JOINS = ("and", "random_forms")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
FashionIQ: clone https://github.com/XiaoxiaoGuo/fashion-iq for captions/ and image_splits/, and
download the images (the repository lists the image URLs) into images/<asin>.png (or .jpg).
Set data.manual_dir to the folder that holds captions/, image_splits/ and images/."""

_CITATION = """
@inproceedings{wu2021fashion,
  title={Fashion IQ: A New Dataset Towards Retrieving Images by Natural Language Feedback},
  author={Wu, Hui and Gao, Yupeng and Guo, Xiaoxiao and Al-Halah, Ziad and Rennie, Steven and
          Grauman, Kristen and Feris, Rogerio},
  booktitle={CVPR},
  year={2021}
}
"""


def _clean(caption: str) -> str:
  """CLIP4Cir's per-caption normalisation: strip '.', '?', ',' and spaces at both ends."""
  return caption.strip(".?, ")


def join_captions(c1: str, c2: str) -> str:
  """The deterministic evaluation text: "<C1> and <c2>" (CLIP4Cir validate.py)."""
  return f"{_clean(c1).capitalize()} and {_clean(c2)}"


def caption_forms(c1: str, c2: str) -> list:
  """CLIP4Cir's four randomised training forms, each drawn with probability 1/4."""
  return [join_captions(c1, c2), join_captions(c2, c1), _clean(c1).capitalize(),
          _clean(c2).capitalize()]


def load_annotations(manual_dir, category: str, split: str) -> tuple[list, list]:
  """(image names of split.<category>.<split>.json, [(candidate, target|'', c1, c2)])."""
  root = pathlib.Path(manual_dir)
  split_path = root / "image_splits" / f"split.{category}.{split}.json"
  names = manual.load_json(split_path, list, MANUAL_DOWNLOAD_INSTRUCTIONS)
  for i, n in enumerate(names):
    if not isinstance(n, str) or not n:
      raise ValueError(f"{split_path}: entry {i} = {n!r} is not an image name")
  cap_path = root / "captions" / f"cap.{category}.{split}.json"
  queries = []
  for i, r in enumerate(manual.load_json(cap_path, list, MANUAL_DOWNLOAD_INSTRUCTIONS)):
    caps = manual.field(r, "captions", list, cap_path, i)
    if len(caps) != 2 or not all(isinstance(c, str) for c in caps):
      raise ValueError(f"{cap_path}: entry {i} field 'captions' = {caps!r}, expected two strings")
    target = manual.field(r, "target", str, cap_path, i) if split != "test" else ""
    queries.append((manual.field(r, "candidate", str, cap_path, i), target, caps[0], caps[1]))
  return names, queries


def image_path(images_dir: pathlib.Path, name: str, extensions) -> str:
  """<images_dir>/<name>.<ext> for the first extension that exists (else the first one)."""
  for ext in extensions:
    path = images_dir / f"{name}.{ext}"
    if path.is_file():
      return str(path)
  return str(images_dir / f"{name}.{extensions[0]}")


def eval_join(split: str, caption_join: str) -> str:
  """The join used for `split`: evaluation text is always the deterministic 'and'."""
  if caption_join not in JOINS:
    raise ValueError(f"data.caption_join={caption_join!r}; valid: {list(JOINS)}")
  return "and" if split != "train" else caption_join


def check_categories(categories) -> tuple:
  """`categories` as a tuple, each checked to be a FashionIQ category."""
  categories = tuple(categories)
  if not categories:
    raise ValueError(f"no FashionIQ category given; valid: {list(CATEGORIES)}")
  for c in categories:
    if c not in CATEGORIES:
      raise ValueError(f"FashionIQ category {c!r}; valid: {list(CATEGORIES)} "
                       f"(the protocol scores each category against its own gallery)")
  return categories


def annotation_files(manual_dir, categories, split: str) -> list:
  """The files `parse_split` reads: split.<c>.<split>.json and cap.<c>.<split>.json per category."""
  root = pathlib.Path(manual_dir)
  return [root / sub / f"{kind}.{c}.{split}.json" for c in categories
          for sub, kind in (("image_splits", "split"), ("captions", "cap"))]


def parse_split(manual_dir, categories, split: str, caption_join: str = "and"
                ) -> manual_tfds.ParsedSplit:
  """Parses `split` of the union of `categories` (in order) into tables.

  Returns:
    ParsedSplit with one label per image (hit = the labelled target) and image
    paths 'images/<asin>' without suffix: `load_fashioniq_split` appends the
    first of data.image_extensions that exists.
  """
  if split not in SPLITS:
    raise ValueError(f"FashionIQ has no split {split!r}; splits: {list(SPLITS)}")
  categories = check_categories(categories)
  join = eval_join(split, caption_join)
  root = pathlib.Path(manual_dir)
  names, row, texts, refs, targets, ids = [], {}, [], [], [], []
  for c in categories:
    cat_names, queries = load_annotations(root, c, split)
    for n in cat_names:
      row.setdefault(n, len(names))
      if row[n] == len(names):
        names.append(n)
    cap_path = root / "captions" / f"cap.{c}.{split}.json"
    for i, (cand, target, c1, c2) in enumerate(queries):
      triplet = f"{c}/{split}/{i}"
      for what, n in (("candidate", cand), ("target", target)):
        if n and n not in row:
          raise ValueError(f"{cap_path}: entry {i} {what} {n!r} is not in "
                           f"split.{c}.{split}.json")
      forms = caption_forms(c1, c2) if join == "random_forms" else [join_captions(c1, c2)]
      for text in forms:
        if not text.strip():
          continue  # an empty form (one caption empty) is not a query
        texts.append(text)
        ids.append(triplet)
        refs.append(row[cand])
        targets.append(row[target] if target else -1)
  targets = np.asarray(targets, np.int64)
  return manual_tfds.ParsedSplit(
      name=f"fashioniq/{'+'.join(categories)}/{split}", image_ids=names,
      image_paths=[f"images/{n}" for n in names], image_labels=np.arange(len(names)),
      ref_index=np.asarray(refs, np.int64), target_index=targets, target_label=targets,
      texts=texts, query_ids=ids,
      protocol=(f"FashionIQ {'+'.join(categories)} {split}: gallery = all images of the "
                f"category's {split} split; hit = the labelled target; text = "
                f"'<C1> and <c2>' (CLIP4Cir)"))


@dataclasses.dataclass(eq=False)
class FashionIQConfig(manual_tfds.ManualConfig):
  """Categories (their union, in order), split and caption join of one prepared table."""
  categories: tuple = ("dress",)
  caption_join: str = "and"


def make_config(categories, split: str, caption_join: str = "and") -> FashionIQConfig:
  """The config '<c1>[+<c2>...].<split>.<join>', e.g. 'dress.val.and' (join 'and' off train)."""
  if split not in SPLITS:
    raise ValueError(f"FashionIQ has no split {split!r}; splits: {list(SPLITS)}")
  categories = check_categories(categories)
  join = eval_join(split, caption_join)
  return FashionIQConfig(
      name=f"{'+'.join(categories)}.{split}.{join}", split=split, categories=categories,
      caption_join=join, description=f"FashionIQ {'+'.join(categories)} {split}, join {join!r}")


class FashionIQ(manual_tfds.ManualBuilder):
  """TFDS builder `cir_fashioniq`: configs '<categories>.<split>.<join>' (manual_tfds)."""

  name = "cir_fashioniq"
  # 1.1.0: query_id = the query's triplet '<category>/<split>/<entry>' (tables prepared
  # by 1.0.0 have none and are prepared again under the new version).
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "query_id names each query's triplet (caption forms share it)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [make_config((c,), "val") for c in CATEGORIES]
  DESCRIPTION = ("FashionIQ (Wu et al., CVPR 2021): dress/shirt/toptee image pairs with two "
                 "relative captions, joined as CLIP4Cir does.")
  HOMEPAGE = "https://github.com/XiaoxiaoGuo/fashion-iq"
  CITATION = _CITATION

  @classmethod
  def config_from_name(cls, name):
    parts = name.split(".")
    if len(parts) != 3:
      return None  # TFDS then lists the predefined configs
    return make_config(tuple(parts[0].split("+")), parts[1], parts[2])

  def parse(self, manual_dir):
    config = self.builder_config
    return parse_split(manual_dir, config.categories, config.split, config.caption_join)

  def source_paths(self, manual_dir):
    return annotation_files(manual_dir, self.builder_config.categories, self.builder_config.split)


def load_fashioniq_split(data_config, split: str, log=print, check_images: bool = True
                         ) -> RetrievalSplit:
  """Builds FashionIQ `split` of `data.category` (train: of `data.train_categories`).

  The annotations are parsed once into the `cir_fashioniq/<config>` TFDS dataset
  under data.data_dir (cir_jax.data.manual_tfds); images are read from manual_dir.

  Args:
    data_config: reads manual_dir, data_dir, category, train_categories,
      caption_join, image_extensions, skip_missing_images.
    split: 'train', 'val' or 'test'.
    log: logger.
    check_images: False parses annotations only.

  Returns:
    RetrievalSplit with one label per image (hit = the labelled target).
  """
  if split not in SPLITS:
    raise ValueError(f"FashionIQ has no split {split!r}; splits: {list(SPLITS)}")
  checks.require_manual_dir(data_config, MANUAL_DOWNLOAD_INSTRUCTIONS)
  categories = (tuple(data_config.train_categories) if split == "train"
                else (data_config.category,))
  config = make_config(categories, split, data_config.caption_join)
  exts = tuple(data_config.image_extensions)
  if not exts:
    raise ValueError("data.image_extensions is empty; e.g. ('png', 'jpg')")
  root = pathlib.Path(data_config.manual_dir)
  parsed = manual_tfds.load_prepared(FashionIQ, config.name, data_config.get("data_dir"),
                                     root, log)
  out = parsed.to_split(root, skip_missing=data_config.skip_missing_images, log=log,
                        instructions=MANUAL_DOWNLOAD_INSTRUCTIONS, check=check_images,
                        resolve=lambda rel: image_path(root, rel, exts))
  if config.caption_join == "random_forms":
    # The forms of one triplet share its id: one group, one form drawn per epoch.
    out.query_groups = np.unique(np.asarray(out.query_ids), return_inverse=True)[1].astype(
        np.int64).reshape(-1)
  log(f"{parsed.name}: {out.num_queries} queries, {out.num_images} gallery images, "
      f"caption_join={config.caption_join}"
      + (f" ({len(set(out.query_ids))} triplets, one form each per epoch)"
         if out.query_groups is not None else ""))
  return out
