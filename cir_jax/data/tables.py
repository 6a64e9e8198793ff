"""In-memory description of one retrieval split: its image table and its queries.

Every dataset module returns a `RetrievalSplit`; the input pipeline and the
evaluator only ever see this shape, whatever the source layout was.

Target sets are expressed with labels: a gallery image is a hit for a query iff
`image_labels[g] == target_label[q]`. CSS uses the scene, Fashion200k the caption,
MIT-States the (adjective, noun) class; CIRR and FashionIQ give every image its
own label so the target set is the single target image.
"""
import dataclasses
from typing import Optional, Sequence

import numpy as np


@dataclasses.dataclass
class RetrievalSplit:
  """One split of a composed-retrieval dataset.

  Attributes:
    name: e.g. 'css/test'.
    images: uint8 [G, H, W, 3] target-domain images (the gallery), or None if
      `image_paths` is given (decoded by the pipeline).
    image_paths: G file paths, when images are read from disk.
    image_labels: int64 [G] target-set label of each gallery image.
    image_ids: G strings naming each image (used in submissions and figures).
    query_images: uint8 [G, H, W, 3] reference-domain renders of the same images
      (CSS 2D->3D), or None to use `images`.
    ref_index: int64 [Q] gallery index of each query's reference image (-1 if the
      reference is not in the gallery); it is excluded from that query's ranking.
    target_index: int64 [Q] gallery index of the labelled target (-1 if unknown,
      e.g. CIRR test).
    target_label: int64 [Q] label of the target set.
    texts: Q modification texts.
    candidates: optional int64 [Q, S] gallery indices of each query's subset
      (CIRR img_set members minus the reference), -1 padded.
    soft_positives: optional int64 [Q, S'] gallery indices of the members whose
      CIRR `target_soft` is > 0 (the target, and the few members the annotators
      judged a partial match, 0.5 or 0.2), -1 padded. Never negatives in training
      (cir_jax.data.pipeline.set_negative_rows); the recall uses target_hard only.
    query_ids: optional Q ids (CIRR pairid) for submission files.
    query_groups: optional int64 [Q]: queries with the same group are alternative
      texts of one training example (FashionIQ's caption forms of one triplet);
      training then draws one query per group per epoch (cir_jax.data.pipeline).
    protocol: how this split is scored (gallery, exclusions, hit rule), copied
      into the results JSON; empty = the generic rule.
    skipped: counts of what the loader dropped, e.g. {'images': 12,
      'queries': 30} with data.skip_missing_images (written to the results).
  """
  name: str
  images: Optional[np.ndarray]
  image_labels: np.ndarray
  image_ids: Sequence[str]
  ref_index: np.ndarray
  target_index: np.ndarray
  target_label: np.ndarray
  texts: Sequence[str]
  image_paths: Optional[Sequence[str]] = None
  query_images: Optional[np.ndarray] = None
  candidates: Optional[np.ndarray] = None
  soft_positives: Optional[np.ndarray] = None
  query_ids: Optional[Sequence[str]] = None
  query_groups: Optional[np.ndarray] = None
  protocol: str = ""
  skipped: dict = dataclasses.field(default_factory=dict)

  @property
  def num_images(self) -> int:
    return len(self.image_labels)

  @property
  def num_queries(self) -> int:
    return len(self.texts)

  def validate(self) -> "RetrievalSplit":
    """Raises ValueError naming the field and offending entry if the split is inconsistent."""
    g, q = self.num_images, self.num_queries
    if (self.images is None) == (self.image_paths is None):
      raise ValueError(f"{self.name}: give exactly one of images / image_paths")
    if self.images is not None and (self.images.dtype != np.uint8 or self.images.ndim != 4
                                    or len(self.images) != g):
      raise ValueError(f"{self.name}: images must be uint8 [{g}, H, W, 3], got "
                       f"{self.images.dtype} {self.images.shape}")
    if self.query_images is not None and self.query_images.shape[0] != g:
      raise ValueError(f"{self.name}: query_images has {self.query_images.shape[0]} rows, "
                       f"expected {g}")
    if len(self.image_ids) != g:
      raise ValueError(f"{self.name}: {len(self.image_ids)} image_ids for {g} images")
    for field in ("ref_index", "target_index", "target_label"):
      values = np.asarray(getattr(self, field))
      if values.shape != (q,):
        raise ValueError(f"{self.name}: {field} has shape {values.shape}, expected ({q},)")
    for field in ("ref_index", "target_index"):
      values = np.asarray(getattr(self, field))
      bad = np.flatnonzero((values < -1) | (values >= g))
      if bad.size:
        raise ValueError(f"{self.name}: {field}[{bad[0]}] = {values[bad[0]]} is outside the "
                         f"gallery of {g} images")
    empty = [i for i, t in enumerate(self.texts) if not str(t).strip()]
    if empty:
      raise ValueError(f"{self.name}: empty modification text for query {empty[0]} "
                       f"({len(empty)} empty in total)")
    if self.query_groups is not None and np.asarray(self.query_groups).shape != (q,):
      raise ValueError(f"{self.name}: query_groups has shape "
                       f"{np.asarray(self.query_groups).shape}, expected ({q},)")
    if self.candidates is not None:
      if self.candidates.ndim != 2 or len(self.candidates) != q:
        raise ValueError(f"{self.name}: candidates must be [{q}, S], got {self.candidates.shape}")
    if self.soft_positives is not None:
      if self.soft_positives.ndim != 2 or len(self.soft_positives) != q:
        raise ValueError(f"{self.name}: soft_positives must be [{q}, S], got "
                         f"{self.soft_positives.shape}")
    return self
