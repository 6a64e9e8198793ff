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
  captions (c1 and c2 / c2 and c1 / c1 / c2, each with probability 1/4) by
  listing all four forms as separate training queries: uniform sampling over
  the expanded list draws each form with the same probability;
* R@10 and R@50 per category, their averages over the three categories and
  the mean of the two averages (`cir_jax.protocols.evaluate_fashioniq`);
* CLIP4Cir (hence SSN) does NOT remove the reference image from the ranking;
  TIRG-family code does. Both variants are reported (eval.gallery_variants),
  each metric key names its variant.

Training uses `data.train_categories` (default all three, as CLIP4Cir): the
union of their train images and queries. test has no targets (not scored here).
About 4% of the original image links are dead: use data.skip_missing_images.
"""
import pathlib

import numpy as np

from cir_jax.data import manual
from cir_jax.data.tables import RetrievalSplit

CATEGORIES = ("dress", "shirt", "toptee")
SPLITS = ("train", "val", "test")
JOINS = ("and", "random_forms")

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
FashionIQ: clone https://github.com/XiaoxiaoGuo/fashion-iq for captions/ and image_splits/, and
download the images (the repository lists the image URLs) into images/<asin>.png (or .jpg).
Set data.manual_dir to the folder that holds captions/, image_splits/ and images/."""


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
  """images/<name>.<ext> for the first extension that exists (else the first one)."""
  for ext in extensions:
    path = images_dir / f"{name}.{ext}"
    if path.is_file():
      return str(path)
  return str(images_dir / f"{name}.{extensions[0]}")


def load_fashioniq_split(data_config, split: str, log=print, check_images: bool = True
                         ) -> RetrievalSplit:
  """Builds FashionIQ `split` of `data.category` (train: of `data.train_categories`).

  Args:
    data_config: reads manual_dir, category, train_categories, caption_join,
      image_extensions, skip_missing_images.
    split: 'train', 'val' or 'test'.
    log: logger.
    check_images: False parses annotations only.

  Returns:
    RetrievalSplit with one label per image (hit = the labelled target).
  """
  if split not in SPLITS:
    raise ValueError(f"FashionIQ has no split {split!r}; splits: {list(SPLITS)}")
  if not data_config.manual_dir:
    raise ValueError("data.manual_dir is empty.\n" + MANUAL_DOWNLOAD_INSTRUCTIONS)
  categories = (tuple(data_config.train_categories) if split == "train"
                else (data_config.category,))
  for c in categories:
    if c not in CATEGORIES:
      raise ValueError(f"FashionIQ category {c!r}; valid: {list(CATEGORIES)} "
                       f"(the protocol scores each category against its own gallery)")
  join = data_config.caption_join
  if join not in JOINS:
    raise ValueError(f"data.caption_join={join!r}; valid: {list(JOINS)}")
  if join == "random_forms" and split != "train":
    join = "and"  # evaluation text is always the deterministic join
  exts = tuple(data_config.image_extensions)
  if not exts:
    raise ValueError("data.image_extensions is empty; e.g. ('png', 'jpg')")
  root = pathlib.Path(data_config.manual_dir)
  names, row, texts, refs, targets = [], {}, [], [], []
  for c in categories:
    cat_names, queries = load_annotations(root, c, split)
    for n in cat_names:
      row.setdefault(n, len(names))
      if row[n] == len(names):
        names.append(n)
    cap_path = root / "captions" / f"cap.{c}.{split}.json"
    for i, (cand, target, c1, c2) in enumerate(queries):
      for what, n in (("candidate", cand), ("target", target)):
        if n and n not in row:
          raise ValueError(f"{cap_path}: entry {i} {what} {n!r} is not in "
                           f"split.{c}.{split}.json")
      forms = caption_forms(c1, c2) if join == "random_forms" else [join_captions(c1, c2)]
      for text in forms:
        if not text.strip():
          continue  # an empty form (one caption empty) is not a query
        texts.append(text)
        refs.append(row[cand])
        targets.append(row[target] if target else -1)
  name = f"fashioniq/{'+'.join(categories)}/{split}"
  images_dir = root / "images"
  out = manual.assemble(
      name, names, [image_path(images_dir, n, exts) for n in names], np.arange(len(names)),
      np.asarray(refs), np.asarray(targets), np.asarray(targets), texts,
      skip_missing=data_config.skip_missing_images,
      protocol=(f"FashionIQ {'+'.join(categories)} {split}: gallery = all images of the "
                f"category's {split} split; hit = the labelled target; text = "
                f"'<C1> and <c2>' (CLIP4Cir)"),
      log=log, instructions=MANUAL_DOWNLOAD_INSTRUCTIONS, check=check_images)
  log(f"{name}: {out.num_queries} queries, {out.num_images} gallery images, "
      f"caption_join={join}")
  return out
