"""Shared plumbing of the manual-download datasets (CIRR, FashionIQ, Fashion200k, MIT-States).

Each dataset module parses its published annotation layout into plain tables
(image names, paths, labels; queries as image rows: `manual_tfds.ParsedSplit`,
prepared once as a TFDS dataset, see cir_jax/data/manual_tfds.py), and every
load calls `assemble`, which checks every image file up front and builds the
`RetrievalSplit`:

* by default a missing, unreadable or non-image file is an error listing the
  first such paths, raised before any training or embedding starts;
* with `data.skip_missing_images=True` missing images are dropped from the
  gallery, queries that lose their reference or their whole target set are
  dropped, subset candidates lose the missing members, and the counts are
  logged and kept in `RetrievalSplit.skipped` (hence in the results JSON).
  Nothing is dropped silently.

Files are checked for existence, readability and an image header (the first
bytes of a PNG, JPEG, GIF, BMP or WebP file: one small read per file), not
decoded: decoding ~200k images up front would cost minutes. A file with a valid
header but corrupt data still fails when tf.data decodes it, with an error
naming the file, its split and its gallery row (cir_jax/data/pipeline.py).
"""
import json
import pathlib
from typing import Any, Optional, Sequence

import numpy as np

from cir_jax.data.tables import RetrievalSplit

MAX_LISTED = 10  # missing paths named in an error message
# Leading bytes of the formats tf.io.decode_image reads (WebP: "RIFF" <size> "WEBP").
_IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
_HEADER_BYTES = 12


def load_json(path: pathlib.Path, kind: type, instructions: str = ""):
  """Reads a JSON annotation file whose top level must be `kind` (list or dict)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"annotation file {path} not found.{_hint(instructions)}")
  try:
    data = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(data, kind):
    raise ValueError(f"{path}: top level must be a JSON {kind.__name__}, got "
                     f"{type(data).__name__}")
  return data


def field(record: Any, name: str, kind, path, index) -> Any:
  """`record[name]`, checked to be of type `kind`; errors name file, entry and field."""
  if not isinstance(record, dict):
    raise ValueError(f"{path}: entry {index} must be a JSON object, got {type(record).__name__}")
  if name not in record:
    raise ValueError(f"{path}: entry {index} has no field {name!r} (fields: {sorted(record)})")
  value = record[name]
  if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
    raise ValueError(f"{path}: entry {index} field {name!r} = {value!r} is not a "
                     f"{getattr(kind, '__name__', kind)}")
  return value


def _hint(instructions: str) -> str:
  return f"\n{instructions.strip()}" if instructions else ""


def readable(path: str) -> bool:
  """True for an existing, readable regular file that starts like an image."""
  try:
    with open(path, "rb") as f:
      head = f.read(_HEADER_BYTES)
  except OSError:  # missing, a directory, no permission
    return False
  return head.startswith(_IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def check_images(paths: Sequence[str], name: str, skip_missing: bool, log=print,
                 instructions: str = "") -> np.ndarray:
  """Checks every image file; returns a bool [len(paths)] mask of usable images.

  Raises:
    FileNotFoundError listing the first missing paths unless `skip_missing`.
  """
  ok = np.fromiter((readable(p) for p in paths), bool, count=len(paths))
  missing = np.flatnonzero(~ok)
  if missing.size and not skip_missing:
    listed = "\n  ".join(str(paths[i]) for i in missing[:MAX_LISTED])
    raise FileNotFoundError(
        f"{name}: {missing.size} of {len(paths)} images are missing, unreadable or not "
        f"images (no PNG/JPEG/GIF/BMP/WebP header), e.g.\n  "
        f"{listed}\nFix the manual_dir, or set data.skip_missing_images=True to drop them "
        f"(the count is logged and written to the results).{_hint(instructions)}")
  if missing.size:
    log(f"{name}: skipping {missing.size} of {len(paths)} missing/unreadable/non-image files "
        f"(data.skip_missing_images=True), e.g. {paths[missing[0]]}")
  return ok


def assemble(name: str, image_ids: Sequence[str], image_paths: Sequence[str],
             image_labels: np.ndarray, ref_row: np.ndarray, target_row: np.ndarray,
             target_label: np.ndarray, texts: Sequence[str], *, skip_missing: bool,
             protocol: str, log=print, candidates: Optional[np.ndarray] = None,
             soft_positives: Optional[np.ndarray] = None,
             query_ids: Optional[Sequence[str]] = None, instructions: str = "",
             check: bool = True) -> RetrievalSplit:
  """Checks the images and builds the validated RetrievalSplit (see module docstring).

  Args:
    name: split name, e.g. 'cirr/val'.
    image_ids, image_paths, image_labels: the G-row image table.
    ref_row: int [Q] image row of each reference.
    target_row: int [Q] image row of the labelled target, -1 if unknown (test).
    target_label: int [Q] target-set label.
    texts: Q modification texts.
    skip_missing: data.skip_missing_images.
    protocol: the scoring rule, kept in the split and the results.
    log: logger.
    candidates: optional int [Q, S] image rows (-1 padded) for Recall_subset.
    soft_positives: optional int [Q, S'] image rows (-1 padded) of members with a
      soft target > 0 (CIRR), remapped like `candidates`.
    query_ids: optional Q ids.
    instructions: the dataset's MANUAL_DOWNLOAD_INSTRUCTIONS, appended to errors.
    check: False only for annotation-only parsing (no image files needed).

  Returns:
    The RetrievalSplit, gallery rows in the given order minus skipped images.
  """
  g = len(image_ids)
  ok = (check_images(image_paths, name, skip_missing, log, instructions) if check
        else np.ones(g, bool))
  ref_row, target_row = np.asarray(ref_row, np.int64), np.asarray(target_row, np.int64)
  target_label = np.asarray(target_label, np.int64)
  image_labels = np.asarray(image_labels, np.int64)
  skipped = {}
  if not ok.all():
    new_row = np.where(ok, np.cumsum(ok) - 1, -1)
    remaining_labels = set(image_labels[ok].tolist())
    has_targets = target_row >= 0
    keep = ok[ref_row] & np.where(has_targets, ok[np.maximum(target_row, 0)], True)
    keep &= np.where(has_targets, [t in remaining_labels for t in target_label], True)
    skipped = {"images": int((~ok).sum()), "queries": int((~keep).sum())}
    log(f"{name}: dropped {skipped['queries']} of {len(keep)} queries whose reference or "
        f"target image is missing")
    ref_row, target_label = new_row[ref_row[keep]], target_label[keep]
    target_row = np.where(target_row[keep] >= 0, new_row[np.maximum(target_row[keep], 0)], -1)
    texts = [t for t, k in zip(texts, keep) if k]
    query_ids = None if query_ids is None else [q for q, k in zip(query_ids, keep) if k]
    if candidates is not None:
      cand = np.where(candidates[keep] >= 0, new_row[np.maximum(candidates[keep], 0)], -1)
      skipped["candidates"] = int(((candidates[keep] >= 0) & (cand < 0)).sum())
      candidates = compact_rows(cand)
    if soft_positives is not None:
      soft = soft_positives[keep]
      soft_positives = compact_rows(np.where(soft >= 0, new_row[np.maximum(soft, 0)], -1))
    image_ids = [i for i, k in zip(image_ids, ok) if k]
    image_paths = [p for p, k in zip(image_paths, ok) if k]
    image_labels = image_labels[ok]
  return RetrievalSplit(
      name=name, images=None, image_paths=list(image_paths), image_labels=image_labels,
      image_ids=list(image_ids), ref_index=ref_row, target_index=target_row,
      target_label=target_label, texts=list(texts), candidates=candidates,
      soft_positives=soft_positives,
      query_ids=None if query_ids is None else list(query_ids), protocol=protocol,
      skipped=skipped).validate()


def compact_rows(rows: np.ndarray) -> np.ndarray:
  """Sorts each row ascending with -1 padding last: [Q, S] -> [Q, S].

  Ascending gallery order makes a stable top-k over candidates break score ties
  by lower gallery index, the rank rule of cir_jax.retrieval.
  """
  big = np.iinfo(np.int64).max
  out = np.sort(np.where(rows >= 0, rows, big), axis=1)
  return np.where(out == big, -1, out)


def labels_of(names: Sequence[str]) -> tuple[np.ndarray, dict]:
  """Integer label per name (first-seen order) and the name -> label map."""
  index: dict = {}
  labels = np.fromiter((index.setdefault(n, len(index)) for n in names), np.int64,
                       count=len(names))
  return labels, index
