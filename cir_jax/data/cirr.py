"""CIRR (Liu et al., ICCV 2021) from its published layout -> RetrievalSplit.

Layout (the official download; `data.manual_dir` points at its root):

  <manual_dir>/captions/cap.rc2.{train,val,test1}.json
  <manual_dir>/image_splits/split.rc2.{train,val,test1}.json   name -> './dev/dev-1-0-img0.png'
  <manual_dir>/<relative path of each image>                    e.g. dev/dev-1-0-img0.png

(The CIRR repository nests the annotations in a `cirr/` folder next to the
image folders; that works too: annotations are looked up in `<manual_dir>/cirr`
when `<manual_dir>/captions` does not exist, images always from `<manual_dir>`.)

Protocol (CIRR section 5, and the official evaluation server):
* gallery = EVERY image of the split file, not only references (val: 2,297
  images, 132 of them never a reference); one label per image, so the only hit
  is `target_hard`;
* the reference is excluded from its own ranking;
* Recall@{1,5,10,50} over the gallery; Recall_subset@{1,2,3} ranks only the
  query's `img_set.members` minus the reference (`RetrievalSplit.candidates`);
  the headline is (R@5 + R_subset@1) / 2 (added by cir_jax.evaluate);
* test1 has no targets: target_index = target_label = -1; it is scored by the
  server from the two files written by tools/cirr_submission.py.

`target_soft` (graded alternative targets) and `img_set` ids are kept in
`load_annotations` for analysis; the official recall uses `target_hard` only.
The set members (minus the reference) with `target_soft` > 0 (the target, and in
val 63 of 4,181 queries another member graded 1.0, 0.5 or 0.2) become
`RetrievalSplit.soft_positives`,
which training never uses as negatives (loss.set_negatives, our extension).

TFDS: `parse_split` is the parser; the `cir_cirr` builder (configs 'val',
'test1', 'train') stores its tables once under data.data_dir and
`load_cirr_split` reads them from there (cir_jax.data.manual_tfds; images are
not copied, they are read from manual_dir).
"""
import dataclasses
import pathlib

import numpy as np

from cir_jax.data import checks
from cir_jax.data import manual
from cir_jax.data import manual_tfds
from cir_jax.data.tables import RetrievalSplit

SPLITS = ("train", "val", "test1")
EMPTY_CAPTION = "empty caption"  # stand-in text for test1's empty caption (logged)
SUBSET_SIZE = 5  # img_set has 6 members, one of them the reference

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
CIRR: clone https://github.com/Cuberick-Orion/CIRR (branch cirr_dataset) for captions/ and
image_splits/, and download the NLVR2 images (raw, from the NLVR2 project) into the folders the
split files name (train/<n>/, dev/, test1/). Set data.manual_dir to the folder that holds
captions/, image_splits/ (or cirr/captions, cirr/image_splits) and the image folders."""

_CITATION = """
@inproceedings{liu2021image,
  title={Image Retrieval on Real-life Images with Pre-trained Vision-and-Language Models},
  author={Liu, Zheyuan and Rodriguez-Opazo, Cristian and Teney, Damien and Gould, Stephen},
  booktitle={ICCV},
  year={2021}
}
"""

PROTOCOL = ("CIRR: gallery = all images of split.rc2.{split}.json; reference excluded; "
            "hit = target_hard; Recall_subset ranks img_set.members minus the reference; "
            "headline (R@5 + R_subset@1)/2")


@dataclasses.dataclass
class Annotation:
  """One CIRR query as published."""
  pairid: int
  reference: str
  caption: str
  members: list
  set_id: int
  target_hard: str = ""           # '' on test1
  target_soft: dict = dataclasses.field(default_factory=dict)


def annotation_dir(manual_dir) -> pathlib.Path:
  """Folder holding captions/ and image_splits/ (manual_dir or manual_dir/cirr)."""
  root = pathlib.Path(manual_dir)
  if not (root / "captions").is_dir() and (root / "cirr" / "captions").is_dir():
    return root / "cirr"
  return root


def load_image_split(manual_dir, split: str) -> dict:
  """name -> relative image path of every image of `split` (file order)."""
  path = annotation_dir(manual_dir) / "image_splits" / f"split.rc2.{split}.json"
  table = manual.load_json(path, dict, MANUAL_DOWNLOAD_INSTRUCTIONS)
  for name, rel in table.items():
    if not isinstance(rel, str) or not rel.strip():
      raise ValueError(f"{path}: image {name!r} has relative path {rel!r}, expected a string")
  return table


def load_annotations(manual_dir, split: str) -> list:
  """Parses cap.rc2.<split>.json into Annotations; malformed entries name file and field."""
  path = annotation_dir(manual_dir) / "captions" / f"cap.rc2.{split}.json"
  records = manual.load_json(path, list, MANUAL_DOWNLOAD_INSTRUCTIONS)
  out = []
  for i, r in enumerate(records):
    img_set = manual.field(r, "img_set", dict, path, i)
    members = manual.field(img_set, "members", list, path, f"{i} img_set")
    ann = Annotation(pairid=manual.field(r, "pairid", int, path, i),
                     reference=manual.field(r, "reference", str, path, i),
                     caption=manual.field(r, "caption", str, path, i),
                     members=members, set_id=manual.field(img_set, "id", int, path, f"{i} img_set"))
    if split != "test1":
      ann.target_hard = manual.field(r, "target_hard", str, path, i)
      ann.target_soft = manual.field(r, "target_soft", dict, path, i)
    out.append(ann)
  return out


def annotation_files(manual_dir, split: str) -> list:
  """The two files `parse_split` reads: cap.rc2.<split>.json and split.rc2.<split>.json."""
  ann = annotation_dir(manual_dir)
  return [ann / "captions" / f"cap.rc2.{split}.json",
          ann / "image_splits" / f"split.rc2.{split}.json"]


def parse_split(manual_dir, split: str) -> manual_tfds.ParsedSplit:
  """Parses CIRR `split` into tables: every image of the split file, queries as rows.

  Returns:
    ParsedSplit with one label per image, candidates [Q, 5] (gallery rows of
    img_set.members minus the reference, ascending), soft_positives [Q, 5] (those
    of them with target_soft > 0, ascending, -1 padded), query_ids = pairids and
    image paths as the split file gives them (relative to manual_dir).
  """
  if split not in SPLITS:
    raise ValueError(f"CIRR has no split {split!r}; splits: {list(SPLITS)}")
  root = pathlib.Path(manual_dir)
  table = load_image_split(root, split)
  anns = load_annotations(root, split)
  names = list(table)
  row = {n: i for i, n in enumerate(names)}
  cap_file = annotation_dir(root) / "captions" / f"cap.rc2.{split}.json"

  def lookup(name, what, i):
    if name not in row:
      raise ValueError(f"{cap_file}: entry {i} {what} {name!r} is not in "
                       f"split.rc2.{split}.json")
    return row[name]

  refs = np.asarray([lookup(a.reference, "reference", i) for i, a in enumerate(anns)], np.int64)
  targets = np.asarray([lookup(a.target_hard, "target_hard", i) if a.target_hard else -1
                        for i, a in enumerate(anns)], np.int64)
  cand = np.full((len(anns), SUBSET_SIZE), -1, np.int64)
  soft = np.full((len(anns), SUBSET_SIZE), -1, np.int64)
  for i, a in enumerate(anns):
    rows = sorted({lookup(m, "img_set member", i) for m in a.members} - {refs[i]})
    if len(rows) > SUBSET_SIZE:
      raise ValueError(f"{cap_file}: entry {i} img_set has {len(a.members)} members, expected "
                       f"{SUBSET_SIZE + 1} including the reference")
    cand[i, :len(rows)] = rows
    soft_rows = sorted(r for r, m in ((lookup(m, "img_set member", i), m) for m in a.members)
                       if r in rows and float(a.target_soft.get(m, -1.0)) > 0)
    soft[i, :len(soft_rows)] = soft_rows
    if a.target_hard and targets[i] not in rows:
      raise ValueError(f"{cap_file}: entry {i} target_hard {a.target_hard!r} is not among its "
                       f"img_set members (minus the reference)")
  texts = [a.caption for a in anns]
  empty = [i for i, t in enumerate(texts) if not t.strip()]
  if empty and split != "test1":
    raise ValueError(f"{cap_file}: entry {empty[0]} has an empty 'caption' "
                     f"({len(empty)} in total)")
  notes = []
  if empty:
    # The server needs a ranking for every pairid (test1 has one empty caption).
    notes.append(f"cirr/test1: {len(empty)} empty captions (pairid "
                 f"{anns[empty[0]].pairid}) replaced by {EMPTY_CAPTION!r}")
    for i in empty:
      texts[i] = EMPTY_CAPTION
  return manual_tfds.ParsedSplit(
      name=f"cirr/{split}", image_ids=names, image_paths=[table[n] for n in names],
      image_labels=np.arange(len(names)), ref_index=refs, target_index=targets,
      target_label=targets, texts=texts, protocol=PROTOCOL.format(split=split),
      candidates=cand, soft_positives=soft, query_ids=[str(a.pairid) for a in anns], notes=notes)


@dataclasses.dataclass(eq=False)
class CirrConfig(manual_tfds.ManualConfig):
  """One CIRR split; CIRR has no other option that changes the tables."""


class Cirr(manual_tfds.ManualBuilder):
  """TFDS builder `cir_cirr`: configs 'val' (default), 'test1', 'train' (manual_tfds)."""

  name = "cir_cirr"
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [CirrConfig(name=s, split=s, description=f"CIRR {s} split")
                     for s in ("val", "test1", "train")]
  NUM_CANDIDATES = SUBSET_SIZE
  DESCRIPTION = ("CIRR (Composed Image Retrieval on Real-life images, Liu et al. ICCV 2021): "
                 "NLVR2 image pairs with a modification caption and a 6-image subset.")
  HOMEPAGE = "https://github.com/Cuberick-Orion/CIRR"
  CITATION = _CITATION

  def parse(self, manual_dir):
    return parse_split(manual_dir, self.builder_config.split)

  def source_paths(self, manual_dir):
    return annotation_files(manual_dir, self.builder_config.split)


def load_cirr_split(data_config, split: str, log=print, check_images: bool = True
                    ) -> RetrievalSplit:
  """Builds CIRR `split` ('train', 'val' or 'test1') as a RetrievalSplit.

  The annotations are parsed once into the `cir_cirr/<split>` TFDS dataset under
  data.data_dir (cir_jax.data.manual_tfds); images are read from manual_dir.

  Args:
    data_config: reads manual_dir, data_dir and skip_missing_images.
    split: 'train', 'val' or 'test1'.
    log: logger.
    check_images: False parses annotations only (tests, statistics).

  Returns:
    RetrievalSplit with one label per image, candidates [Q, 5] (gallery rows of
    img_set.members minus the reference, ascending) and query_ids = pairids.
  """
  if split not in SPLITS:
    raise ValueError(f"CIRR has no split {split!r}; splits: {list(SPLITS)}")
  checks.require_manual_dir(data_config, MANUAL_DOWNLOAD_INSTRUCTIONS)
  parsed = manual_tfds.load_prepared(Cirr, split, data_config.get("data_dir"),
                                     data_config.manual_dir, log)
  out = parsed.to_split(data_config.manual_dir, skip_missing=data_config.skip_missing_images,
                        log=log, instructions=MANUAL_DOWNLOAD_INSTRUCTIONS, check=check_images)
  log(f"cirr/{split}: {out.num_queries} queries, {out.num_images} gallery images"
      + ("" if split != "test1" else " (no targets: submission only)"))
  return out
