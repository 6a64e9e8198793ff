"""tf.data input pipelines that feed global, sharded jax.Arrays.

Training order is a pure function of (seed, step) (cir_jax/data/order.py, shared
with device-resident data): epoch e is a permutation of the training examples cut
into floor(n / B) full batches, the rest dropped (PyTorch's drop_last=True, as
google/tirg and CLIP4Cir train), so no batch spans two epochs. An example is a
query, or, when the split has `query_groups` (FashionIQ's caption forms), a
group: each epoch draws one member of each group, so a batch never holds two
texts of one triplet (they would be each other's false negatives) and over epochs
every form is used, as CLIP4Cir's generate_randomized_fiq_caption does per
triplet and batch. Every process computes the same global batch indices and
keeps its own contiguous slice, so

* resuming at step s reproduces the uninterrupted run exactly (no iterator state);
* N processes see exactly the batches one process would (the multi-host test).

Images come either from an in-memory uint8 table (CSS; gathered, no decoding,
already at their size) or from files (real datasets; decoded and brought to
S x S in parallel by `data.preprocess`: each paper's resize/crop/pad, see
cir_jax.data.preprocess). Text is
tokenised once per split, up front, in one vectorised call. Pixels stay uint8
until they reach the device.
"""
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf

from cir_jax import sharding
from cir_jax.data import order
from cir_jax.data.batching import encode_texts, padded_batches as _padded_batches  # noqa: F401
from cir_jax.data.batching import process_slice as _process_slice, set_negative_rows  # noqa: F401
from cir_jax.data import preprocess as preprocess_lib
from cir_jax.data.tables import RetrievalSplit
from cir_jax.data.vocab import Vocabulary

AUTOTUNE = tf.data.AUTOTUNE


def preprocess_kwargs(data_config) -> dict:
  """The pipelines' image preprocessing arguments from `config.data` (file-based images only).

  'squash' when the config predates `data.preprocess` (its old behaviour).
  """
  return {"preprocess": data_config.get("preprocess", "squash"),
          "pad_ratio": float(data_config.get("target_pad_ratio", 1.25))}


class _ImageSource:
  """Gathers (in-memory) or decodes (files) images by gallery index, inside tf.data."""

  def __init__(self, images: Optional[np.ndarray], paths, image_size: int,
               preprocess: str = "squash", pad_ratio: float = 1.25):
    preprocess_lib.check(preprocess, pad_ratio)
    self.image_size = image_size
    self.preprocess, self.pad_ratio = preprocess, pad_ratio
    if images is not None:
      # A variable, not a constant: large tables would overflow the 2 GB graph limit.
      self.table = tf.Variable(images, trainable=False)
      self.paths = None
    else:
      self.table = None
      self.path_list = [str(p) for p in paths]
      self.paths = tf.constant(self.path_list)
      # Eager callers (evaluation) get the traced decoder: eager map_fn decodes one
      # file at a time (~10x slower on CIRR val).
      self._decode_traced = tf.function(self._decode)

  def load(self, index):
    """int64 [n] indices -> uint8 [n, S, S, 3]."""
    if self.table is not None:
      return tf.gather(self.table, index)
    if tf.executing_eagerly():  # evaluation: the failing batch is this call
      try:
        return self._decode_traced(index)
      except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
        raise self.decode_error(np.asarray(index), e) from e
    return self._decode(index)

  def decode_error(self, index, error, context: str = "") -> ValueError:
    """A ValueError naming the files among gallery `index` that cannot be read or decoded.

    TF's own error (inside tf.data or map_fn) does not say which file failed, so
    the batch's files are re-read one by one, eagerly, with the same decoder.
    """
    bad = []
    for i in sorted(set(np.asarray(index).ravel().tolist())):
      try:
        tf.io.decode_image(tf.io.read_file(self.path_list[i]), channels=3,
                           expand_animations=False)
      except tf.errors.OpError as e:
        bad.append(f"{self.path_list[i]} (gallery index {i}: {e.message.strip().splitlines()[0]})")
    where = f" ({context})" if context else ""
    if not bad:
      return ValueError(f"reading images {sorted(set(np.asarray(index).ravel().tolist()))}"
                        f"{where} failed: {error.message}")
    more = f"; {len(bad) - 1} more bad file(s) in this batch: {bad[1:4]}" if len(bad) > 1 else ""
    return ValueError(f"cannot read or decode image {bad[0]}{where}{more}")

  def _decode(self, index):
    def decode(i):
      data = tf.io.read_file(self.paths[i])
      image = tf.io.decode_image(data, channels=3, expand_animations=False)
      return preprocess_lib.preprocess_image(image, self.image_size, self.preprocess,
                                             self.pad_ratio)

    return tf.map_fn(decode, index, fn_output_signature=tf.TensorSpec(
        [self.image_size, self.image_size, 3], tf.uint8), parallel_iterations=16)


def _options():
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = 0
  return options


class TrainPipeline:
  """Yields training batches: dict of global arrays 'ref_image', 'target_image',
  'text_ids', 'text_mask' (leading dim = global batch, sharded over 'data').

  With `set_negatives` = S > 0 also 'set_negative_images' uint8 [B, S, H, W, 3] and
  'set_negative_mask' bool [B, S]: the first S members of each query's image set
  (`split.candidates`, CIRR's img_set minus the reference) other than its target,
  in gallery order, padded (mask False) to S.
  """

  def __init__(self, split: RetrievalSplit, vocab: Vocabulary, max_len: int, global_batch: int,
               mesh, seed: int, image_size: int, log=print, set_negatives: int = 0,
               preprocess: str = "squash", pad_ratio: float = 1.25):
    self.split = split.validate()
    self.mesh = mesh
    self.global_batch = global_batch
    self.local_batch = sharding.local_batch_size(global_batch, mesh)
    self.seed = seed
    ids, mask = encode_texts(split, vocab, max_len, log)
    self.text_ids, self.text_mask = tf.constant(ids), tf.constant(mask)
    self.ref_index = tf.constant(np.asarray(split.ref_index, np.int64))
    self.target_index = tf.constant(np.asarray(split.target_index, np.int64))
    if (np.asarray(split.ref_index) < 0).any() or (np.asarray(split.target_index) < 0).any():
      raise ValueError(f"{split.name}: training queries need a reference and a target image")
    self._set_groups(split.query_groups)
    self.set_negatives = None
    if set_negatives:
      self.set_negatives = tf.constant(set_negative_rows(split, set_negatives))
    self.targets = _ImageSource(split.images, split.image_paths, image_size, preprocess,
                                pad_ratio)
    self.refs = (self.targets if split.query_images is None
                 else _ImageSource(split.query_images, None, image_size))

  def _set_groups(self, groups):
    """An epoch's examples: the queries, or the groups of `split.query_groups`."""
    self.groups = None if groups is None else order.Groups(groups)
    self.num_examples = self.split.num_queries if groups is None else self.groups.num

  def steps_per_epoch(self) -> int:
    return order.steps_per_epoch(self.num_examples, self.global_batch)

  def step_indices(self, step):
    """Query indices of global batch `step` (all processes), int64 [B].

    cir_jax/data/order.py defines the order (NumPy here, JAX for device-resident data).
    """
    n, b = self.num_examples, self.global_batch
    order.steps_per_epoch(n, b)  # a batch larger than the examples fails here, named
    indices = tf.numpy_function(
        lambda s: order.step_indices_np(self.seed, int(s), n, b, self.groups), [step],
        tf.int64, stateful=False)
    return tf.ensure_shape(indices, [b])

  def dataset(self, start_step: int) -> tf.data.Dataset:
    if self.global_batch > self.num_examples:
      raise ValueError(f"batch_size={self.global_batch} exceeds the {self.num_examples} "
                       f"training examples of {self.split.name}")

    def load(step):
      q = _process_slice(self.step_indices(step), self.local_batch)
      batch = {
          "ref_image": self.refs.load(tf.gather(self.ref_index, q)),
          "target_image": self.targets.load(tf.gather(self.target_index, q)),
          "text_ids": tf.gather(self.text_ids, q),
          "text_mask": tf.gather(self.text_mask, q),
      }
      if self.set_negatives is not None:
        rows = tf.gather(self.set_negatives, q)                         # [b, S], -1 = none
        images = self.targets.load(tf.reshape(tf.maximum(rows, 0), [-1]))
        batch["set_negative_images"] = tf.reshape(
            images, tf.concat([tf.shape(rows), tf.shape(images)[1:]], 0))
        batch["set_negative_mask"] = rows >= 0
      return batch

    ds = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
    return ds.map(load, num_parallel_calls=AUTOTUNE).prefetch(4).with_options(_options())

  def batches(self, start_step: int = 0) -> Iterator[dict]:
    iterator = self.dataset(start_step).as_numpy_iterator()
    step = start_step
    while True:
      try:
        local = next(iterator)
      except StopIteration:
        return
      except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
        raise self._image_error(step, e) from e
      yield sharding.to_global(local, self.mesh)
      step += 1

  def _image_error(self, step, error) -> Exception:
    """Names the undecodable file of training batch `step` (batches come in order)."""
    if self.targets.table is not None:
      return error
    q = _process_slice(self.step_indices(step).numpy(), self.local_batch)
    index = np.asarray(self.split.target_index)[q]
    if self.refs is self.targets:
      index = np.concatenate([np.asarray(self.split.ref_index)[q], index])
    if self.set_negatives is not None:
      rows = self.set_negatives.numpy()[q].ravel()
      index = np.concatenate([index, rows[rows >= 0]])
    return self.targets.decode_error(index, error, f"{self.split.name}, training step {step}")


class EvalPipeline:
  """Query and gallery batches of one split for evaluation, padded to whole global batches."""

  def __init__(self, split: RetrievalSplit, vocab: Vocabulary, max_len: int, global_batch: int,
               mesh, image_size: int, max_queries: int = 0, log=print,
               preprocess: str = "squash", pad_ratio: float = 1.25):
    self.split = split.validate()
    self.mesh = mesh
    self.global_batch = global_batch
    self.local_batch = sharding.local_batch_size(global_batch, mesh, "eval.batch_size")
    self.num_queries = (min(max_queries, split.num_queries) if max_queries
                        else split.num_queries)
    self.text_ids, self.text_mask = encode_texts(split, vocab, max_len, log)
    self.gallery_source = _ImageSource(split.images, split.image_paths, image_size,
                                       preprocess, pad_ratio)
    self.query_source = (self.gallery_source if split.query_images is None
                         else _ImageSource(split.query_images, None, image_size))

  def _batches(self, num_items, make):
    for index in _padded_batches(num_items, self.global_batch, self.local_batch):
      local = make(tf.constant(index, tf.int64))
      yield sharding.to_global({k: np.asarray(v) for k, v in local.items()}, self.mesh)

  def gallery_batches(self) -> Iterator[dict]:
    """dict 'image' uint8 [B, S, S, 3]; rows past `split.num_images` are padding."""
    return self._batches(self.split.num_images,
                         lambda i: {"image": self.gallery_source.load(i)})

  def query_batches(self) -> Iterator[dict]:
    """dict 'ref_image', 'text_ids', 'text_mask'; rows past `num_queries` are padding."""
    ref = np.maximum(np.asarray(self.split.ref_index), 0)

    def make(i):
      return {"ref_image": self.query_source.load(tf.gather(ref, i)),
              "text_ids": tf.gather(self.text_ids, i),
              "text_mask": tf.gather(self.text_mask, i)}

    return self._batches(self.num_queries, make)

  def num_steps(self, num_items):
    return max(1, -(-num_items // self.global_batch))
