"""Training batches of precomputed (cached) frozen-tower features, gathered by index.

The features of a frozen image tower are one row per gallery image ('images':
a tree of [G, ...] arrays, e.g. {'projected': [G, d]}), of a separate query
tower or query render table another tree ('query_images'), of a frozen text
tower one row per query ('texts'). A batch is the same indices as the pixel
pipelines draw (cir_jax/data/order.py: a pure function of seed and step, one
member per group for FashionIQ's caption forms) gathered from these tables:

  'ref_features', 'target_features'  trees of [B, ...] (RetrievalModel inputs),
  'text_features' (tree [B, ...]) or 'text_ids' int32 [B, L], 'text_mask' bool [B, L],
  with set negatives also 'set_negative_features' [B, N, ...], 'set_negative_mask'.

`FeatureTrainData` keeps every table on the mesh (replicated) and gathers inside
the jitted train step (as DeviceTrainData does for pixels); `HostFeatureData`
gathers on the host from memory-mapped .npy files (features too large for the
device) and feeds global batches. Both call the same `gather`.
"""
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cir_jax import sharding
from cir_jax.data import batching
from cir_jax.data import order
from cir_jax.data.tables import RetrievalSplit


def index_tables(split: RetrievalSplit, vocab, max_len: int, text_features: bool,
                 set_negatives: int = 0, log=print) -> dict:
  """The split's small host tables: 'ref_index', 'target_index' int32 [Q], 'text_ids',
  'text_mask' [Q, L] (unless the text features are cached), 'set_negatives' [Q, N] and
  'groups' (order.Groups.tables()) when the split has query_groups."""
  if (np.asarray(split.ref_index) < 0).any() or (np.asarray(split.target_index) < 0).any():
    raise ValueError(f"{split.name}: training queries need a reference and a target image")
  tables = {"ref_index": np.asarray(split.ref_index, np.int32),
            "target_index": np.asarray(split.target_index, np.int32)}
  if not text_features:
    tables["text_ids"], tables["text_mask"] = batching.encode_texts(split, vocab, max_len, log)
  if set_negatives:
    tables["set_negatives"] = batching.set_negative_rows(split, set_negatives).astype(np.int32)
  if split.query_groups is not None:
    tables["groups"] = order.Groups(split.query_groups).tables()
  return tables


def num_examples(split: RetrievalSplit) -> int:
  """Examples of one epoch: queries, or groups of `query_groups`."""
  return split.num_queries if split.query_groups is None else order.Groups(split.query_groups).num


def gather(tables: dict, q, xp=jnp) -> dict:
  """The batch of query indices `q` [B] (see the module docstring); `xp` = jnp or np."""
  take = lambda tree, i: jax.tree.map(lambda x: x[i], tree)
  refs = tables["features"].get("query_images", tables["features"]["images"])
  batch = {"ref_features": take(refs, tables["ref_index"][q]),
           "target_features": take(tables["features"]["images"], tables["target_index"][q])}
  if "texts" in tables["features"]:
    batch["text_features"] = take(tables["features"]["texts"], q)
  else:
    batch["text_ids"], batch["text_mask"] = tables["text_ids"][q], tables["text_mask"][q]
  if "set_negatives" in tables:
    rows = tables["set_negatives"][q]                            # [B, N], -1 = none
    batch["set_negative_features"] = take(tables["features"]["images"], xp.maximum(rows, 0))
    batch["set_negative_mask"] = rows >= 0
  return batch


class FeatureTrainData:
  """Feature and index tables on the mesh; `batch(tables, step, seed)` runs in the step.

  Same interface as device_data.DeviceTrainData: `tables` is an argument of the
  jitted step, `batch` is traceable and returns global batch `step` sharded
  over 'data'.
  """

  def __init__(self, split: RetrievalSplit, features: dict, index: dict, global_batch: int,
               mesh, seed: int, log=print):
    self.split, self.mesh, self.global_batch, self.seed = split, mesh, global_batch, seed
    self.num_examples = num_examples(split)
    order.steps_per_epoch(self.num_examples, global_batch)  # a too-large batch fails, named
    sharding.local_batch_size(global_batch, mesh)
    self.tables = sharding.put_replicated({**index, "features": features}, mesh)
    log(f"{split.name}: {tree_bytes(features) / 2**20:.1f} MiB of cached features placed on "
        f"each of {mesh.size} device(s); batches are gathered inside the train step")

  def batch(self, tables: dict, step, seed=None) -> dict:
    seed = self.seed if seed is None else seed
    q = order.step_indices_jax(seed, step, self.num_examples, self.global_batch,
                               tables.get("groups"))
    spec = NamedSharding(self.mesh, P(sharding.DATA_AXIS))
    q = jax.lax.with_sharding_constraint(q, spec)
    return jax.lax.with_sharding_constraint(gather(tables, q), spec)


class HostFeatureData:
  """Feature tables on the host (memory-mapped .npy); `batches(start)` yields global batches.

  Each process gathers its own slice of every global batch (the order of
  cir_jax/data/order.py), as TrainPipeline does for pixels.
  """

  def __init__(self, split: RetrievalSplit, features: dict, index: dict, global_batch: int,
               mesh, seed: int, log=print):
    self.split, self.mesh, self.global_batch, self.seed = split, mesh, global_batch, seed
    self.num_examples = num_examples(split)
    order.steps_per_epoch(self.num_examples, global_batch)
    self.local_batch = sharding.local_batch_size(global_batch, mesh)
    self.tables = {**index, "features": features}
    self.groups: Optional[order.Groups] = (None if split.query_groups is None
                                           else order.Groups(split.query_groups))
    log(f"{split.name}: {tree_bytes(features) / 2**20:.1f} MiB of cached features read from "
        f"the host (memory-mapped) for each batch")

  def batches(self, start_step: int = 0) -> Iterator[dict]:
    step = start_step
    while True:
      q = order.step_indices_np(self.seed, step, self.num_examples, self.global_batch,
                                self.groups)
      local = gather(self.tables, batching.process_slice(q, self.local_batch), np)
      flat, tree = jax.tree.flatten(local)
      spec = sharding.batch_sharding(self.mesh)
      yield jax.tree.unflatten(tree, [
          jax.make_array_from_process_local_data(spec, np.ascontiguousarray(x)) for x in flat])
      step += 1


def tree_bytes(tree) -> int:
  return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))
