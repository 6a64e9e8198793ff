"""CIRR test1 submission files: prediction, writing and validation.

The CIRR evaluation server (Liu et al., ICCV 2021; format of the repository's
demo_files/test1_pred_ranks_recall*.json) takes two JSON files:

  recall:        {"version": "rc2", "metric": "recall",
                  "<pairid>": [50 image names, best first], ...}
  recall_subset: {"version": "rc2", "metric": "recall_subset",
                  "<pairid>": [3 image names from img_set.members minus the reference], ...}

with one entry per test1 pair, never the reference image itself. The ranking
uses the module rank of cir_jax.retrieval (score descending, ties by lower
gallery index) and runs on device; only the [Q, 50] and [Q, 3] ids reach the host.
"""
import json
import pathlib
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cir_jax import retrieval
from cir_jax import sharding
from cir_jax.data.tables import RetrievalSplit

VERSION = "rc2"
RECALL_K = 50
SUBSET_K = 3
FILENAMES = {"recall": "test1_pred_ranks_recall.json",
             "recall_subset": "test1_pred_ranks_recall_subset.json"}


@jax.jit
def _subset_scores(query_emb, gallery_emb, candidates):
  """[Q, d] x gallery [G, d] at candidate rows [Q, S] -> [Q, S] scores, -inf at padding."""
  emb = jnp.take(gallery_emb, jnp.maximum(candidates, 0), axis=0)
  s = jnp.einsum("qd,qsd->qs", query_emb, emb, preferred_element_type=jnp.float32)
  return jnp.where(candidates >= 0, s, -jnp.inf)


def subset_topk(query_emb: jax.Array, gallery_emb: jax.Array, candidates: np.ndarray,
                k: int = SUBSET_K) -> np.ndarray:
  """Top-k candidate gallery rows per query: [Q, d], [G, d], [Q, S] -> int [Q, k].

  Candidates are ascending per row (cir_jax.data.cirr), and lax.top_k is
  stable, so equal scores come out by lower gallery index.
  """
  q = candidates.shape[0]
  scores = _subset_scores(query_emb[:q], gallery_emb, jnp.asarray(candidates))
  _, pos = jax.lax.top_k(scores, k)
  return np.take_along_axis(candidates, np.asarray(jax.device_get(pos)), axis=1)


def predict(query_emb, gallery_emb, split: RetrievalSplit, mesh=None
            ) -> tuple[np.ndarray, np.ndarray]:
  """(top-50 gallery rows with the reference excluded [Q, 50], subset top-3 rows [Q, 3]).

  Args:
    query_emb: [Q(_padded), d] query embeddings (rows past Q ignored).
    gallery_emb: [G(_padded), d] gallery embeddings (rows past G never retrieved).
    split: the cirr/test1 RetrievalSplit (candidates required).
    mesh: gallery mesh, None = one device.
  """
  if split.candidates is None:
    raise ValueError(f"{split.name}: no subset candidates; load it with cir_jax.data.cirr")
  q, g = split.num_queries, split.num_images
  exclude = np.full(query_emb.shape[0], -1, np.int64)
  exclude[:q] = split.ref_index
  _, top = retrieval.gallery_topk(
      query_emb, gallery_emb, RECALL_K, mesh or sharding.single_device_mesh(),
      exclude_index=exclude, gallery_valid=np.arange(gallery_emb.shape[0]) < g)
  top = np.asarray(jax.device_get(top))[:q]
  return top, subset_topk(query_emb, gallery_emb, split.candidates)


def make_submission(split: RetrievalSplit, top: np.ndarray, subset: np.ndarray
                    ) -> tuple[dict, dict]:
  """The two server dicts from gallery rows (see module docstring)."""
  if split.query_ids is None:
    raise ValueError(f"{split.name}: no query_ids (pairids)")
  names = np.asarray(split.image_ids)
  recall = {"version": VERSION, "metric": "recall"}
  recall_subset = {"version": VERSION, "metric": "recall_subset"}
  for qid, t, s in zip(split.query_ids, top, subset):
    recall[str(qid)] = names[t].tolist()
    recall_subset[str(qid)] = names[s].tolist()
  return recall, recall_subset


def validate_submission(recall: dict, recall_subset: dict, annotations: Sequence,
                        image_names: Sequence[str]) -> None:
  """Raises ValueError naming the file, pairid and problem if a submission is malformed.

  Args:
    recall, recall_subset: the two dicts (as json.load returns them).
    annotations: the test1 cirr.Annotation list (pairid, reference, members).
    image_names: every image name of split.rc2.test1.json.
  """
  known = set(image_names)
  expected = {str(a.pairid): a for a in annotations}
  for what, sub, k in (("recall", recall, RECALL_K), ("recall_subset", recall_subset, SUBSET_K)):
    if sub.get("version") != VERSION or sub.get("metric") != what:
      raise ValueError(f"{FILENAMES[what]}: needs 'version': {VERSION!r} and 'metric': "
                       f"{what!r}, got {sub.get('version')!r}, {sub.get('metric')!r}")
    keys = set(sub) - {"version", "metric"}
    if keys != set(expected):
      missing, extra = sorted(set(expected) - keys), sorted(keys - set(expected))
      raise ValueError(f"{FILENAMES[what]}: pairids differ from the test1 annotations: "
                       f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unknown "
                       f"(e.g. {extra[:3]})")
    for qid, ranked in sub.items():
      if qid in ("version", "metric"):
        continue
      ann = expected[qid]
      if not isinstance(ranked, list) or len(ranked) != k or len(set(ranked)) != k:
        raise ValueError(f"{FILENAMES[what]}: pairid {qid} needs {k} distinct names, got "
                         f"{ranked!r}")
      if ann.reference in ranked:
        raise ValueError(f"{FILENAMES[what]}: pairid {qid} ranks its reference {ann.reference}")
      pool = set(ann.members) - {ann.reference} if what == "recall_subset" else known
      bad = [n for n in ranked if n not in pool]
      if bad:
        raise ValueError(f"{FILENAMES[what]}: pairid {qid} ranks {bad[0]!r}, which is not "
                         + ("in its img_set minus the reference" if what == "recall_subset"
                            else "a test1 image"))


def write_submission(out_dir, recall: dict, recall_subset: dict) -> dict:
  """Writes the two files into `out_dir`; returns {metric: path}."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = {}
  for what, sub in (("recall", recall), ("recall_subset", recall_subset)):
    paths[what] = out / FILENAMES[what]
    paths[what].write_text(json.dumps(sub))
  return paths
