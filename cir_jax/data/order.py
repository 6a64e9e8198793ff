"""The training order: query indices of each step as a pure function of (seed, step).

One definition, two bit-identical implementations: NumPy (the tf.data pipeline
calls it) and JAX (device-resident data draw their batch inside the jitted
step). Epoch e is a permutation of the n training examples cut into floor(n / B)
full batches, the rest dropped (PyTorch's drop_last=True, as google/tirg and
CLIP4Cir train), so no batch spans two epochs; step s is batch s mod floor(n / B)
of epoch s div floor(n / B). An example is a query or, when the split has
`query_groups` (FashionIQ's caption forms of one triplet), a group: each epoch
draws one member of each group, so a batch never holds two texts of one triplet
(each other's false negatives) and over epochs every member is used.

The permutation of epoch e sorts a keyed hash of the example index: key_i =
fmix32(h ^ (i * 0x9E3779B9)) with h = fmix32(seed ^ fmix32(e + 0x632BE5AB)),
fmix32 being MurmurHash3's 32-bit finaliser. Both maps are bijections of the
uint32 range, so keys never tie and the order does not depend on the sort's
tie-breaking. A group's member is fmix32(key_i ^ 0x5BD1E995) mod its size. All
arithmetic is uint32 with wrap-around, the same in NumPy, JAX (without x64) and
on every backend.
"""
import numpy as np

_GOLDEN = 0x9E3779B9
_EPOCH_SALT = 0x632BE5AB
_MEMBER_SALT = 0x5BD1E995


def _fmix32(x, xp):
  x = x ^ (x >> xp.uint32(16))
  x = x * xp.uint32(0x85EBCA6B)
  x = x ^ (x >> xp.uint32(13))
  x = x * xp.uint32(0xC2B2AE35)
  return x ^ (x >> xp.uint32(16))


def _keys(seed, epoch, n: int, xp):
  """uint32 [n] sort keys of epoch `epoch` (a scalar, possibly traced)."""
  if isinstance(seed, (int, np.integer)):
    seed = xp.uint32(int(seed) % 2**32)
  else:  # a traced per-replica seed (several seeds in one program)
    seed = xp.asarray(seed).astype(xp.uint32)
  epoch = xp.asarray(epoch).astype(xp.uint32)
  h = _fmix32(seed ^ _fmix32(epoch + xp.uint32(_EPOCH_SALT), xp), xp)
  i = xp.arange(n, dtype=xp.uint32)
  return _fmix32(h ^ (i * xp.uint32(_GOLDEN)), xp)


def epoch_permutation_np(seed: int, epoch: int, n: int) -> np.ndarray:
  """int64 [n]: the order of the queries in epoch `epoch`."""
  with np.errstate(over="ignore"):
    return np.argsort(_keys(seed, epoch, n, np), kind="stable").astype(np.int64)


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
  _check(num_examples, global_batch)
  return num_examples // global_batch


def step_indices_np(seed: int, step: int, num_examples: int, global_batch: int,
                    groups=None) -> np.ndarray:
  """int64 [B]: query indices of global batch `step`.

  `groups`: None (an example is a query) or `Groups` (an example is a group).
  """
  per_epoch = steps_per_epoch(num_examples, global_batch)
  epoch, offset = divmod(int(step), per_epoch)
  examples = epoch_permutation_np(seed, epoch, num_examples)[
      offset * global_batch:(offset + 1) * global_batch]
  if groups is None:
    return examples
  with np.errstate(over="ignore"):
    pick = _fmix32(_keys(seed, epoch, num_examples, np)[examples] ^ np.uint32(_MEMBER_SALT), np)
  size = groups.size[examples]
  return groups.members[groups.start[examples] + (pick % size.astype(np.uint32)).astype(np.int64)]


def step_indices_jax(seed, step, num_examples: int, global_batch: int, groups=None):
  """int32 [B]: the same indices as `step_indices_np`, from a traced `step`.

  `seed` is a Python int or a traced integer (one per replica under vmap).
  `groups`: None, or `Groups.tables()` as (device) arrays: an example is then a
  group and one member is drawn per group, as in `step_indices_np`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  per_epoch = steps_per_epoch(num_examples, global_batch)
  step = jnp.asarray(step, jnp.int32)
  epoch, offset = step // per_epoch, (step % per_epoch) * global_batch
  keys = _keys(seed, epoch, num_examples, jnp)
  perm = jnp.argsort(keys, stable=True).astype(jnp.int32)
  examples = jax.lax.dynamic_slice(perm, (offset,), (global_batch,))
  if groups is None:
    return examples
  pick = _fmix32(keys[examples] ^ jnp.uint32(_MEMBER_SALT), jnp)
  size = groups["size"][examples].astype(jnp.uint32)
  return groups["members"][groups["start"][examples] + (pick % size).astype(jnp.int32)]


class Groups:
  """Member tables of `RetrievalSplit.query_groups` (int [Q], one id per query).

  Attributes:
    num: number of groups (the examples of an epoch).
    members: int64 [Q] query indices, grouped, each group in query order.
    start, size: int64 [num] where each group's members begin in `members`, how many.
  """

  def __init__(self, query_groups):
    query_groups = np.asarray(query_groups, np.int64)
    _, inverse, sizes = np.unique(query_groups, return_inverse=True, return_counts=True)
    self.members = np.argsort(inverse, kind="stable").astype(np.int64)
    self.num = len(sizes)
    self.size = sizes.astype(np.int64)
    self.start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

  def tables(self) -> dict:
    """int32 'members', 'start', 'size' (what `step_indices_jax` reads, e.g. on device)."""
    return {"members": self.members.astype(np.int32), "start": self.start.astype(np.int32),
            "size": self.size.astype(np.int32)}


def _check(num_examples: int, global_batch: int):
  if global_batch > num_examples:
    raise ValueError(f"batch_size={global_batch} exceeds the {num_examples} training examples")
