"""The TensorFlow-free pieces of batching, shared by the tf.data pipeline and
device-resident data: text encoding, CIRR set negatives, each process's slice of
a global batch and the padded evaluation batches."""
import jax
import numpy as np

from cir_jax.data.tables import RetrievalSplit


def encode_texts(split: RetrievalSplit, vocab, max_len: int, log=print):
  """Tokenises every query text of `split`: -> ids int32 [Q, L], mask bool [Q, L]."""
  ids, mask, truncated = vocab.encode(split.texts, max_len)
  empty = np.flatnonzero(mask.sum(1) == 0)
  if empty.size:
    raise ValueError(f"{split.name}: query {empty[0]} text {split.texts[empty[0]]!r} has no "
                     f"words after tokenisation ({empty.size} such queries)")
  if truncated:
    log(f"{split.name}: {truncated} of {split.num_queries} texts longer than max_text_len="
        f"{max_len} words were truncated")
  return ids, mask


def process_slice(global_indices, local_batch):
  start = jax.process_index() * local_batch
  return global_indices[start:start + local_batch]


def set_negative_rows(split: RetrievalSplit, size: int) -> np.ndarray:
  """int64 [Q, size]: each query's image-set members that are neither its reference, nor
  in its target set, nor graded a partial match (`split.soft_positives`, CIRR's
  target_soft > 0), -1 padded: the extra negatives of loss.set_negatives, our extension
  (CIRPLANT's paper and code use the set members only as positives)."""
  if split.candidates is None:
    raise ValueError(f"{split.name} has no image sets (RetrievalSplit.candidates), so "
                     f"loss.set_negatives={size} cannot be used; set it to 0")
  candidates = np.asarray(split.candidates, np.int64)
  labels = np.asarray(split.image_labels)
  valid = candidates >= 0
  valid &= candidates != np.asarray(split.ref_index)[:, None]
  valid &= labels[np.maximum(candidates, 0)] != np.asarray(split.target_label)[:, None]
  if split.soft_positives is not None:
    soft = np.asarray(split.soft_positives, np.int64)
    valid &= ~((candidates[:, :, None] == soft[:, None, :]) & (soft[:, None, :] >= 0)).any(-1)
  rows = np.full((len(candidates), size), -1, np.int64)
  for i, (row, ok) in enumerate(zip(candidates, valid)):
    members = row[ok][:size]
    rows[i, :len(members)] = members
  return rows


def padded_batches(num_items: int, global_batch: int, local_batch: int):
  """This process's item indices per eval step, padded (with item 0) so that every
  process runs the same steps; rows past `num_items` are padding the evaluator masks."""
  steps = max(1, -(-num_items // global_batch))
  padded = np.arange(steps * global_batch)
  padded = np.where(padded < num_items, padded, 0)
  for s in range(steps):
    yield process_slice(padded[s * global_batch:(s + 1) * global_batch], local_batch)
