"""Manual-download datasets as TFDS builders: annotations prepared once, images left in place.

CIRR, FashionIQ, Fashion200k and MIT-States cannot be downloaded by code: the
user puts each dataset's published files in a `manual_dir`, and each dataset
module's MANUAL_DOWNLOAD_INSTRUCTIONS says exactly what goes where (TFDS prints
it when the manual_dir is missing or empty). One small `ManualBuilder`
subclass per dataset, defined in the dataset's module and registered with TFDS
when that module is imported (`cir_cirr`, `cir_fashioniq`, `cir_fashion200k`,
`cir_mit_states`), parses that layout with the module's own parser, once, into

  <data_dir>/<builder>/<config>/1.1.0/     e.g. data_cache/cir_cirr/val/1.1.0

* one TFDS split, named after the dataset split, whose examples are the
  split's QUERIES:

    index                    int64   position in the parsed query list (TFDS
                                     shuffles examples on write; readers sort)
    query_id                 Text    CIRR pairid; '' for the other datasets
    text                     Text    modification text
    ref_id, ref_index        Text, int64   reference image id and gallery row
    target_id, target_index  Text, int64   labelled target; '' and -1 when the
                                     split has none (CIRR test1, FashionIQ test)
    target_label             int64   target-set label: a gallery image is a hit
                                     iff its label equals it
    candidates               int64 [S]  CIRR only: gallery rows of the
                                     img_set members minus the reference, -1 padded

* `builder.info.metadata` (metadata.json, saved with the dataset): the GALLERY
  table `gallery = {image_ids, image_paths, image_labels}` (G entries each;
  paths RELATIVE to manual_dir), the split's `name` and scoring `protocol`,
  `notes` about the data logged at every load (e.g. CIRR test1's replaced empty
  caption), `has_query_ids`, and `sources`: the sha256 of every annotation
  file (or listing) the parser read.

Rows are the exact keys (Fashion200k's label files name some images twice, so
an id is not unique); ids are kept for other readers of the dataset.

Images are NOT copied into the TFRecords: CIRR, FashionIQ and Fashion200k are
tens of GB of JPEG/PNG, a copy would double the disk use for nothing, and the
input pipeline (cir_jax.data.pipeline) decodes them from manual_dir with
tf.data in parallel. A prepared dataset is an index of the user's files;
`manual.assemble` checks those files at every load (data.skip_missing_images).

`load_prepared` prepares on first use and afterwards only reads: a second load
does not parse. It compares `sources` with the files now in manual_dir: a
changed file (a fixed annotation, another copy of the dataset) is prepared
again, logged; absent files (annotations archived after preparing) keep the
prepared tables, logged. An edited annotation is thus never silently ignored.

Configs name the split and every option that changes the parsed tables, e.g.
`tfds.builder("cir_fashioniq/dress.val.and", data_dir=...)`; the configs in
BUILDER_CONFIGS are examples, any valid name parses (`config_from_name`).
Version 1.1.0 (1.1.0 added CIRR's soft_positives); `url_infos = None` as cir_jax.data.css
explains (TFDS 4.9.10).
"""
import abc
import dataclasses
import hashlib
import os
import pathlib
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from cir_jax.data import manual
from cir_jax.data.tables import RetrievalSplit

_VERSION = "1.1.0"
_CHUNK = 1 << 20  # bytes hashed at a time
_PARSE_BATCH = 1 << 15  # serialized queries parsed per tf.io.parse_example call


@dataclasses.dataclass
class ParsedSplit:
  """The annotation tables of one split, as a dataset module's parser returns them.

  The gallery rows are in the published order; paths are relative to the
  manual_dir (FashionIQ: 'images/<asin>', the suffix found at load time).

  Attributes:
    name: split name, e.g. 'cirr/val'.
    image_ids: G image names.
    image_paths: G paths relative to manual_dir.
    image_labels: int64 [G] target-set label of each image.
    ref_index: int64 [Q] gallery row of each reference.
    target_index: int64 [Q] gallery row of the labelled target, -1 if unknown.
    target_label: int64 [Q] target-set label, -1 if unknown.
    texts: Q modification texts.
    protocol: the scoring rule (kept in the RetrievalSplit and the results).
    candidates: optional int64 [Q, S] subset rows (CIRR), -1 padded.
    soft_positives: optional int64 [Q, S] subset rows with target_soft > 0 (CIRR), -1 padded.
    query_ids: optional Q ids (CIRR pairids).
    notes: log lines about the data, repeated at every load.
  """
  name: str
  image_ids: list
  image_paths: list
  image_labels: np.ndarray
  ref_index: np.ndarray
  target_index: np.ndarray
  target_label: np.ndarray
  texts: list
  protocol: str
  candidates: Optional[np.ndarray] = None
  soft_positives: Optional[np.ndarray] = None
  query_ids: Optional[list] = None
  notes: list = dataclasses.field(default_factory=list)

  def to_split(self, manual_dir, *, skip_missing: bool, log=print, instructions: str = "",
               check: bool = True, resolve: Optional[Callable[[str], str]] = None
               ) -> RetrievalSplit:
    """Checks the image files and builds the RetrievalSplit (`manual.assemble`).

    Args:
      manual_dir: the folder the relative image paths are under.
      skip_missing: data.skip_missing_images.
      log: logger; `notes` go here first.
      instructions: the dataset's MANUAL_DOWNLOAD_INSTRUCTIONS, appended to errors.
      check: False for annotation-only use (no image files needed).
      resolve: relative path -> file path; default `manual_dir / path`.
    """
    root = pathlib.Path(manual_dir)
    resolve = resolve or (lambda rel: str(root / rel))
    for note in self.notes:
      log(note)
    return manual.assemble(
        self.name, self.image_ids, [resolve(p) for p in self.image_paths], self.image_labels,
        self.ref_index, self.target_index, self.target_label, self.texts,
        skip_missing=skip_missing, protocol=self.protocol, log=log, candidates=self.candidates,
        soft_positives=self.soft_positives, query_ids=self.query_ids,
        instructions=instructions, check=check)


def digest(path: pathlib.Path) -> Optional[str]:
  """sha256 of a file's bytes, or of a folder's sorted relative file list; None if absent."""
  path = pathlib.Path(path)
  h = hashlib.sha256()
  if path.is_file():
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(_CHUNK), b""):
        h.update(chunk)
  elif path.is_dir():
    # A folder is a source when its listing is the annotation (MIT-States'
    # '<adj> <noun>' folders); hashing the names avoids reading every image.
    for top, dirs, files in os.walk(path):
      dirs.sort()
      rel = os.path.relpath(top, path)
      for name in sorted(files):
        h.update(f"{rel}/{name}\n".encode())
  else:
    return None
  return h.hexdigest()


SAMPLING_PATTERN = r"p(\d+)\.seed(\d+)"  # matches `sampling_name`


def sampling_name(pairs_per_image: int, seed: int) -> str:
  """'p<pairs_per_image>.seed<seed>': the config-name part of a sampled training table."""
  if pairs_per_image < 1:
    raise ValueError(f"data.pairs_per_image={pairs_per_image} must be >= 1")
  if seed < 0:
    raise ValueError(f"data.dataset_seed={seed} must be >= 0")
  return f"p{pairs_per_image}.seed{seed}"


@dataclasses.dataclass(eq=False)
class ManualConfig(tfds.core.BuilderConfig):
  """A config prepares one dataset split (downloads are often partial: CIRR without train)."""
  split: str = ""


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the manual-download builders (module docstring); subclasses parse one layout.

  A subclass sets `name`, MANUAL_DOWNLOAD_INSTRUCTIONS, BUILDER_CONFIGS (of a
  `ManualConfig` subclass), DESCRIPTION, HOMEPAGE, CITATION, NUM_CANDIDATES
  (subset size, 0 = none), and implements `parse` and `source_paths`
  (and `config_from_name` when its configs take parameters).
  """

  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {"1.0.0": "Queries as examples; gallery table in metadata; images stay "
                            "in manual_dir.",
                   "1.1.0": "CIRR: 'soft_positives', the subset members with target_soft > 0."}
  # Nothing is downloaded by code, so there are no URL checksums (see cir_jax.data.css).
  url_infos = None
  NUM_CANDIDATES = 0
  DESCRIPTION = ""
  HOMEPAGE = ""
  CITATION = ""

  @classmethod
  def get_builder_config(cls, name, version=None):
    """A predefined config, or the one `config_from_name` parses from `name`."""
    config = super().get_builder_config(name, version)
    return config if config is not None else cls.config_from_name(name)

  @classmethod
  def config_from_name(cls, name: str) -> Optional[ManualConfig]:
    """The config named `name` beyond BUILDER_CONFIGS, or None (TFDS then lists the valid ones)."""
    del name
    return None

  @abc.abstractmethod
  def parse(self, manual_dir: pathlib.Path) -> ParsedSplit:
    """Parses this config's split from the published layout under `manual_dir`."""

  @abc.abstractmethod
  def source_paths(self, manual_dir: pathlib.Path) -> Sequence[pathlib.Path]:
    """The annotation files (or folders) `parse` reads, for the staleness check."""

  def sources(self, manual_dir) -> dict:
    """{path relative to manual_dir: digest or None} of every source."""
    root = pathlib.Path(manual_dir)
    return {str(p.relative_to(root)): digest(p) for p in self.source_paths(root)}

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        "index": np.int64,
        "query_id": tfds.features.Text(),
        "text": tfds.features.Text(),
        "ref_id": tfds.features.Text(),
        "ref_index": np.int64,
        "target_id": tfds.features.Text(),
        "target_index": np.int64,
        "target_label": np.int64,
    }
    if self.NUM_CANDIDATES:
      features["candidates"] = tfds.features.Tensor(shape=(self.NUM_CANDIDATES,),
                                                    dtype=np.int64)
      features["soft_positives"] = tfds.features.Tensor(shape=(self.NUM_CANDIDATES,),
                                                        dtype=np.int64)
    return self.dataset_info_from_configs(
        description=(f"{self.DESCRIPTION} One example per query; the gallery table is in "
                     "info.metadata['gallery'], images are read from the manual_dir."),
        features=tfds.features.FeaturesDict(features),
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    root = pathlib.Path(dl_manager.manual_dir)  # raises with the instructions if absent/empty
    parsed = self.parse(root)
    if not parsed.texts:  # TFDS cannot write an empty split; say which annotations are empty
      raise ValueError(f"{parsed.name}: the annotation files under {root} hold no queries: "
                       f"{[str(p) for p in self.source_paths(root)]}")
    self.info.metadata.update(
        name=parsed.name, protocol=parsed.protocol, notes=list(parsed.notes),
        has_query_ids=parsed.query_ids is not None, sources=self.sources(root),
        gallery={"image_ids": list(parsed.image_ids),
                 "image_paths": list(parsed.image_paths),
                 "image_labels": np.asarray(parsed.image_labels, np.int64).tolist()})
    return {self.builder_config.split: self._generate_examples(parsed)}

  def _generate_examples(self, parsed: ParsedSplit):
    ids = parsed.image_ids
    for i, text in enumerate(parsed.texts):
      ref, target = int(parsed.ref_index[i]), int(parsed.target_index[i])
      example = {
          "index": i,
          "query_id": parsed.query_ids[i] if parsed.query_ids is not None else "",
          "text": text,
          "ref_id": ids[ref] if ref >= 0 else "",
          "ref_index": ref,
          "target_id": ids[target] if target >= 0 else "",
          "target_index": target,
          "target_label": int(parsed.target_label[i]),
      }
      if self.NUM_CANDIDATES:
        example["candidates"] = np.asarray(parsed.candidates[i], np.int64)
        soft = (np.full(self.NUM_CANDIDATES, -1, np.int64) if parsed.soft_positives is None
                else parsed.soft_positives[i])
        example["soft_positives"] = np.asarray(soft, np.int64)
      yield i, example


def _read_queries(builder: ManualBuilder) -> dict:
  """All examples of the builder's split as {feature: numpy [Q, ...]}, in file order.

  These features need no decoding beyond parsing (ints, utf-8 bytes), so the
  records are parsed a batch at a time with tf.io.parse_example: TFDS's
  per-example decoding (`as_dataset`) costs ~80 us a query, 6 s for FashionIQ
  train's 72k, at every load; batched parsing ~0.4 s.
  """
  files = [os.fspath(f) for f in builder.info.splits[builder.builder_config.split].filepaths]
  spec = builder.info.features.tf_example_spec
  batches = [tf.io.parse_example(records, spec)
             for records in tf.data.TFRecordDataset(files).batch(_PARSE_BATCH)]
  return {k: np.concatenate([b[k].numpy() for b in batches]) for k in spec}


def read_prepared(builder: ManualBuilder) -> ParsedSplit:
  """The ParsedSplit stored by a prepared builder (queries in parse order)."""
  meta = builder.info.metadata
  q = _read_queries(builder)
  order = np.argsort(q["index"], kind="stable")
  if not np.array_equal(q["index"][order], np.arange(len(order))):
    raise ValueError(f"{builder.data_dir}: query indices are not 0..{len(order) - 1}; the "
                     f"prepared dataset is damaged, delete that folder to prepare it again")
  text = lambda key: [t.decode("utf-8") for t in q[key][order]]
  gallery = meta["gallery"]
  return ParsedSplit(
      name=meta["name"], image_ids=list(gallery["image_ids"]),
      image_paths=list(gallery["image_paths"]),
      image_labels=np.asarray(gallery["image_labels"], np.int64).reshape(-1),
      ref_index=q["ref_index"][order], target_index=q["target_index"][order],
      target_label=q["target_label"][order], texts=text("text"), protocol=meta["protocol"],
      candidates=q["candidates"][order] if builder.NUM_CANDIDATES else None,
      soft_positives=q["soft_positives"][order] if builder.NUM_CANDIDATES else None,
      query_ids=text("query_id") if meta["has_query_ids"] else None,
      notes=list(meta["notes"]))


def load_prepared(builder_cls: type, config_name: str, data_dir, manual_dir,
                  log=print) -> ParsedSplit:
  """Prepares `builder_cls/config_name` into `data_dir` if needed, then reads it.

  Args:
    builder_cls: a ManualBuilder subclass.
    config_name: its config, e.g. 'val'.
    data_dir: TFDS data directory (data.data_dir).
    manual_dir: the user's download (data.manual_dir).
    log: logger.

  Returns:
    The ParsedSplit; preparation parses only when the dataset is not prepared yet
    or an annotation file in manual_dir changed since (module docstring).
  """
  if not str(data_dir or "").strip():
    raise ValueError(f"data.data_dir is not set: {builder_cls.name} keeps its prepared "
                     f"annotation tables there (e.g. --config.data.data_dir=data_cache)")
  builder = builder_cls(data_dir=str(data_dir), config=config_name)
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  exists = builder.data_path.exists()  # checked first: is_prepared() warns when absent
  if exists and builder.is_prepared():
    prepared, now = builder.info.metadata.get("sources", {}), builder.sources(manual_dir)
    changed = sorted(p for p, d in now.items() if d is not None and prepared.get(p) != d)
    absent = sorted(p for p, d in now.items() if d is None)
    if not changed:
      if absent:
        log(f"{builder.info.full_name}: {absent} not in {manual_dir}; using the tables "
            f"prepared in {builder.data_dir}")
      return read_prepared(builder)
    log(f"{builder.info.full_name}: {changed} changed since it was prepared; preparing again")
    mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS  # overwrites the dataset
  elif exists:
    log(f"{builder.info.full_name}: {builder.data_dir} is incomplete; preparing again")
    mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
  else:
    log(f"{builder.info.full_name}: parsing {manual_dir} once into {builder.data_dir}")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir), download_mode=mode))
  return read_prepared(builder_cls(data_dir=str(data_dir), config=config_name))
