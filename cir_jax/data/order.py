"""The training order: query indices of each step as a pure function of (seed, step).

One definition, two bit-identical implementations: NumPy (the tf.data pipeline
calls it) and JAX (device-resident data draw their batch inside the jitted
step). The example stream is the concatenation of per-epoch permutations and
step s takes positions [s*B, (s+1)*B) of it, so a batch spans at most two
epochs (B <= n).

The permutation of epoch e sorts a keyed hash of the query index: key_i =
fmix32(h ^ (i * 0x9E3779B9)) with h = fmix32(seed ^ fmix32(e + 0x632BE5AB)),
fmix32 being MurmurHash3's 32-bit finaliser. Both maps are bijections of the
uint32 range, so keys never tie and the order does not depend on the sort's
tie-breaking. All arithmetic is uint32 with wrap-around, the same in NumPy, JAX
(without x64) and on every backend.
"""
import numpy as np

_GOLDEN = 0x9E3779B9
_EPOCH_SALT = 0x632BE5AB


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


def step_indices_np(seed: int, step: int, num_queries: int, global_batch: int) -> np.ndarray:
  """int64 [B]: query indices of global batch `step`."""
  _check(num_queries, global_batch)
  positions = int(step) * global_batch + np.arange(global_batch, dtype=np.int64)
  epochs, offsets = positions // num_queries, positions % num_queries
  first = int(epochs[0])
  perms = np.stack([epoch_permutation_np(seed, first, num_queries),
                    epoch_permutation_np(seed, first + 1, num_queries)])
  return perms[epochs - first, offsets]


def step_indices_jax(seed: int, step, num_queries: int, global_batch: int):
  """int32 [B]: the same indices as `step_indices_np`, from a traced int32 `step`.

  `seed` is a Python int or a traced integer (one per replica under vmap).
  Exact for num_queries < 46341 (intermediate products stay below 2**31).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  _check(num_queries, global_batch)
  if num_queries >= 46341:
    raise ValueError(f"{num_queries} training queries: the in-graph order is exact only below "
                     f"46341; use data.placement='host'")
  step = jnp.asarray(step, jnp.int32)
  # First position's epoch and offset without forming step * B (int32 overflow):
  # step*B = step*(q*n + r) with B = q*n + r.
  q, r = divmod(global_batch, num_queries)
  e0 = step * q + (step // num_queries) * r + ((step % num_queries) * r) // num_queries
  o0 = ((step % num_queries) * r) % num_queries
  offsets = o0 + jnp.arange(global_batch, dtype=jnp.int32)
  epochs = offsets // num_queries          # 0 or 1 (B <= n)
  offsets = offsets % num_queries
  perm0 = jnp.argsort(_keys(seed, e0, num_queries, jnp), stable=True)
  perm1 = jnp.argsort(_keys(seed, e0 + 1, num_queries, jnp), stable=True)
  return jnp.where(epochs == 0, perm0[offsets], perm1[offsets]).astype(jnp.int32)


def _check(num_queries: int, global_batch: int):
  if global_batch > num_queries:
    raise ValueError(f"batch_size={global_batch} exceeds the {num_queries} training queries")
