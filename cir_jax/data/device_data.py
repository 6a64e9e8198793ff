"""Device-resident datasets: the training split on the mesh, each batch drawn in the step.

When a split's images are an in-memory uint8 table (CSS, random test splits) and
fit `data.device_memory_fraction` of one device's memory, `DeviceTrainData` puts
the tables on every device once (replicated) and `batch(tables, step)`, called
inside the jitted train step, gathers global batch `step`: the query indices of
cir_jax/data/order.py (the tf.data pipeline's order, a pure function of seed and
step), then references, targets, texts (and CIRR set negatives), sharded over
'data'. The host only dispatches steps. `ArrayEvalPipeline` is the evaluation
counterpart for in-memory splits (NumPy slices, no TensorFlow).

`config.data.placement`: 'host' (tf.data), 'device', or 'auto' (device when the
split is in memory and fits, else host). No augmentation happens on either path
for in-memory tables, so the batches are identical (tests/test_device_data.py).
"""
import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cir_jax import sharding
from cir_jax.data import batching
from cir_jax.data import order
from cir_jax.data.tables import RetrievalSplit

PLACEMENTS = ("auto", "device", "host")


def table_bytes(split: RetrievalSplit) -> int:
  """Bytes of the split's image tables (gallery and, if separate, query renders)."""
  total = split.images.nbytes if split.images is not None else 0
  return total + (split.query_images.nbytes if split.query_images is not None else 0)


def device_memory_bytes(device=None) -> int:
  """Memory of one device: the allocator's limit on accelerators, physical RAM on CPU."""
  device = device or jax.devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without memory stats)
    pass
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_placement(data_config, split: RetrievalSplit, log=print) -> str:
  """'device' or 'host' for `split` under data.placement; 'device' when impossible is an error."""
  placement = data_config.get("placement", "host")
  if placement not in PLACEMENTS:
    raise ValueError(f"data.placement={placement!r}; valid: {list(PLACEMENTS)}")
  if placement == "host":
    return "host"
  if split.query_groups is not None:  # one member per group per epoch: the host order only
    if placement == "device":
      raise ValueError(f"data.placement='device': {split.name} has query_groups (one caption "
                       f"form per triplet per epoch), which only the host pipeline draws; use "
                       f"'host' or 'auto'")
    return "host"
  if split.images is None:
    if placement == "device":
      raise ValueError(f"data.placement='device' needs an in-memory image table, but "
                       f"{split.name} reads image files; use 'host' or 'auto'")
    return "host"
  fraction = data_config.get("device_memory_fraction", 0.25)
  need, have = table_bytes(split), device_memory_bytes()
  if need > fraction * have:
    if placement == "device":
      raise ValueError(f"data.placement='device': {split.name}'s images need {need / 2**30:.2f} "
                       f"GiB, more than data.device_memory_fraction={fraction} of the "
                       f"{have / 2**30:.1f} GiB of one device")
    log(f"{split.name}: images ({need / 2**30:.2f} GiB) exceed {fraction} of device memory; "
        f"feeding them from the host")
    return "host"
  return "device"


class DeviceTrainData:
  """A training split's tables on the mesh and the in-step gather of each global batch.

  `tables` (a dict of replicated jax.Arrays) is an argument of the jitted step,
  never a closed-over constant; `batch(tables, step, seed)` is traceable and
  returns what TrainPipeline yields for that step: 'ref_image', 'target_image'
  uint8 [B, S, S, 3], 'text_ids' int32 [B, L], 'text_mask' bool [B, L] (and with
  set_negatives = N, 'set_negative_images' [B, N, S, S, 3], 'set_negative_mask').
  """

  def __init__(self, split: RetrievalSplit, vocab, max_len: int, global_batch: int, mesh,
               seed: int, log=print, set_negatives: int = 0):
    self.split = split.validate()
    if split.images is None:
      raise ValueError(f"{split.name} reads image files; device placement needs a table")
    if (np.asarray(split.ref_index) < 0).any() or (np.asarray(split.target_index) < 0).any():
      raise ValueError(f"{split.name}: training queries need a reference and a target image")
    if global_batch > split.num_queries:
      raise ValueError(f"batch_size={global_batch} exceeds the {split.num_queries} training "
                       f"queries of {split.name}")
    sharding.local_batch_size(global_batch, mesh)
    self.mesh, self.global_batch, self.seed = mesh, global_batch, seed
    self.num_queries = split.num_queries
    ids, mask = batching.encode_texts(split, vocab, max_len, log)
    host = {"images": split.images,
            "ref_index": np.asarray(split.ref_index, np.int32),
            "target_index": np.asarray(split.target_index, np.int32),
            "text_ids": ids, "text_mask": mask}
    if split.query_images is not None:
      host["query_images"] = split.query_images
    if set_negatives:
      host["set_negatives"] = batching.set_negative_rows(split, set_negatives).astype(np.int32)
    self.tables = sharding.put_replicated(host, mesh)
    log(f"{split.name}: {table_bytes(split) / 2**20:.1f} MiB of images placed on each of "
        f"{mesh.size} device(s); batches are drawn inside the train step")

  def batch(self, tables: dict, step, seed=None) -> dict:
    """Global batch `step` (traced int) of data order `seed` (default: this split's seed)."""
    seed = self.seed if seed is None else seed
    q = order.step_indices_jax(seed, step, self.num_queries, self.global_batch)
    spec = NamedSharding(self.mesh, P(sharding.DATA_AXIS))
    q = jax.lax.with_sharding_constraint(q, spec)
    refs = tables.get("query_images", tables["images"])
    batch = {"ref_image": refs[tables["ref_index"][q]],
             "target_image": tables["images"][tables["target_index"][q]],
             "text_ids": tables["text_ids"][q],
             "text_mask": tables["text_mask"][q]}
    if "set_negatives" in tables:
      rows = tables["set_negatives"][q]                       # [B, N], -1 = none
      batch["set_negative_images"] = tables["images"][jnp.maximum(rows, 0)]
      batch["set_negative_mask"] = rows >= 0
    return jax.lax.with_sharding_constraint(batch, spec)


class ArrayEvalPipeline:
  """EvalPipeline for in-memory splits without TensorFlow: the same padded global batches.

  Same interface as pipeline.EvalPipeline (gallery_batches, query_batches,
  num_steps, global_batch, num_queries); images are NumPy slices of the table.
  """

  def __init__(self, split: RetrievalSplit, vocab, max_len: int, global_batch: int, mesh,
               max_queries: int = 0, log=print):
    if split.images is None:
      raise ValueError(f"{split.name} reads image files; ArrayEvalPipeline needs a table")
    self.split = split.validate()
    self.mesh = mesh
    self.global_batch = global_batch
    self.local_batch = sharding.local_batch_size(global_batch, mesh, "eval.batch_size")
    self.num_queries = (min(max_queries, split.num_queries) if max_queries
                        else split.num_queries)
    self.text_ids, self.text_mask = batching.encode_texts(split, vocab, max_len, log)
    self.query_table = split.images if split.query_images is None else split.query_images

  def _batches(self, num_items, make) -> Iterator[dict]:
    for index in batching.padded_batches(num_items, self.global_batch, self.local_batch):
      yield sharding.to_global(make(index), self.mesh)

  def gallery_batches(self) -> Iterator[dict]:
    return self._batches(self.split.num_images, lambda i: {"image": self.split.images[i]})

  def query_batches(self) -> Iterator[dict]:
    ref = np.maximum(np.asarray(self.split.ref_index), 0)
    return self._batches(self.num_queries, lambda i: {
        "ref_image": self.query_table[ref[i]], "text_ids": self.text_ids[i],
        "text_mask": self.text_mask[i]})

  def num_steps(self, num_items):
    return max(1, -(-num_items // self.global_batch))

