"""On-device retrieval: sharded gallery top-k, Recall@K and Recall_subset@K.

Similarity is the dot product of L2-normalised embeddings (cosine). The gallery
stays sharded over the mesh's batch axis; queries are scored block by block so
a device holds at most [block_size, G / devices] scores; only the final
scalars (and, for submission files, top-k ids) are copied to the host.

One rank definition is used everywhere (in-batch recall during training,
gallery recall, Recall_subset): candidates are ordered by score descending,
equal scores by lower gallery index (a stable sort). The rank of the target is
  rank = #{j : s_j > s_t} + #{j : s_j == s_t and j < t},
and it is a hit at K if rank < K. This is exactly "the target is among the
first K ids returned by `gallery_topk`", so in-step recall equals eval recall
on the same embeddings even with exact ties. (Counting only strictly greater
scores would be order-free but would give collapsed embeddings, where all
scores tie, a recall of 100.)

Recall_subset follows CIRR (Liu et al., ICCV 2021, section 5): rank only the
members of the query's image set minus the reference.
"""

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cir_jax import sharding


def _scores(query: jax.Array, gallery: jax.Array) -> jax.Array:
  """[q, d] x [g, d] -> [q, g] float32 dot products, the one scoring op."""
  return jnp.einsum('qd,gd->qg', query, gallery,
                    preferred_element_type=jnp.float32)


def _stable_rank(scores: jax.Array, target_score: jax.Array,
                 cand_ids: jax.Array, target_id: jax.Array,
                 cand_valid: Optional[jax.Array] = None) -> jax.Array:
  """Rank of the target in a stable descending sort (see module docstring).

  Args:
    scores: [q, c] candidate scores.
    target_score: [q] score of each row's target.
    cand_ids: [c] or [q, c] gallery ids of the candidates (tie-break key).
    target_id: [q] gallery id of each row's target.
    cand_valid: optional [q, c] bool; invalid candidates never outrank.

  Returns:
    [q] int32 rank, 0 = first.
  """
  ts = target_score[:, None]
  before = (scores > ts) | ((scores == ts) & (cand_ids < target_id[:, None]))
  if cand_valid is not None:
    before &= cand_valid
  return jnp.sum(before, axis=1, dtype=jnp.int32)


def _percent(hits: jax.Array, valid: jax.Array) -> jax.Array:
  """100 * (# valid hits) / (# valid), 0 when nothing is valid."""
  count = jnp.sum(valid, dtype=jnp.float32)
  return 100.0 * jnp.sum(hits & valid, dtype=jnp.float32) / jnp.maximum(count,
                                                                        1.0)


def _axis_size(mesh: Mesh, axis_name: str) -> int:
  if axis_name not in mesh.shape:
    raise ValueError(f'mesh has axes {tuple(mesh.shape)}, no {axis_name!r}')
  return mesh.shape[axis_name]


def in_batch_recall(query: jax.Array,
                    target: jax.Array,
                    ks: Sequence[int] = (1, 5, 10),
                    mesh: Optional[Mesh] = None,
                    axis_name: str = 'data') -> dict[str, jax.Array]:
  """Recall@K of each query against the targets of the global batch.

  Query i's positive is target i; the other B-1 targets are distractors. With
  a mesh, `query` and `target` are global arrays sharded along axis 0; each
  device all-gathers the targets and ranks its local queries, so the device
  memory is [B / devices, B].

  Args:
    query: [B, d] query embeddings (L2-normalised).
    target: [B, d] target embeddings (L2-normalised).
    ks: the K values.
    mesh: mesh the arrays are sharded on; None computes on one device.
    axis_name: batch axis of `mesh`.

  Returns:
    {'R@K': scalar float32 percent (0-100)} with the module's stable rank.
  """
  ks = tuple(ks)

  def recall(q, t_all, own):
    s = _scores(q, t_all)
    target_score = jnp.take_along_axis(s, own[:, None], axis=1)[:, 0]
    rank = _stable_rank(s, target_score, jnp.arange(t_all.shape[0]), own)
    return {f'R@{k}': 100.0 * jnp.mean(rank < k, dtype=jnp.float32)
            for k in ks}

  if mesh is None:
    return recall(query, target, jnp.arange(query.shape[0]))

  num_devices = _axis_size(mesh, axis_name)
  batch = query.shape[0]
  if batch % num_devices:
    raise ValueError(
        f'in_batch_recall: global batch size {batch} is not divisible by the '
        f"{num_devices} devices of mesh axis '{axis_name}'")
  b_local = batch // num_devices

  def per_device(q, t):
    own = jax.lax.axis_index(axis_name) * b_local + jnp.arange(b_local)
    local = recall(q, jax.lax.all_gather(t, axis_name, tiled=True), own)
    # Equal shard sizes make the mean of shard means the global mean.
    return jax.tree.map(lambda x: jax.lax.pmean(x, axis_name), local)

  return jax.shard_map(per_device, mesh=mesh,
                       in_specs=(P(axis_name), P(axis_name)),
                       out_specs=P())(query, target)


def pad_to_multiple(x: jax.Array, multiple: int,
                    fill=0) -> tuple[jax.Array, jax.Array]:
  """Pads axis 0 of `x` up to a multiple of `multiple`.

  Args:
    x: [n, ...] array.
    multiple: positive int.
    fill: value of the padding rows.

  Returns:
    ([n_pad, ...] padded array, [n_pad] bool mask, True on the original rows).
  """
  n = x.shape[0]
  pad = (-n) % multiple
  widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
  padded = jnp.pad(x, widths, constant_values=fill)
  return padded, jnp.arange(n + pad) < n


def shard_gallery(emb: jax.Array, mesh: Mesh, axis_name: str = 'data',
                  gallery_valid: Optional[jax.Array] = None
                 ) -> tuple[jax.Array, jax.Array]:
  """Pads the gallery to a multiple of the device count and shards it.

  Do this once per evaluation and pass the results to `gallery_topk` /
  `evaluate_retrieval`, so the gallery is placed on the devices once.

  Args:
    emb: [G, d] gallery embeddings.
    mesh: target mesh.
    axis_name: axis to shard the gallery rows over.
    gallery_valid: optional [G] bool, False for rows that must never be
      retrieved (e.g. padding from the embedding loop).

  Returns:
    ([G_pad, d] array sharded along rows, [G_pad] bool valid mask, same
    sharding); padding rows are zeros and invalid.
  """
  num_devices = _axis_size(mesh, axis_name)
  padded, valid = pad_to_multiple(emb, num_devices)
  if gallery_valid is not None:
    valid &= jnp.pad(jnp.asarray(gallery_valid, bool),
                     (0, padded.shape[0] - emb.shape[0]))
  row_sharding = NamedSharding(mesh, P(axis_name))
  return jax.device_put(padded, row_sharding), jax.device_put(valid, row_sharding)


GALLERY_BLOCK = 65536   # gallery rows scored at a time per query block (docs/benchmarks.md, 2026-12-04)
TOPK_CHUNK = 32         # chunk width of the exact pruning in `_block_topk`


def _block_topk(s: jax.Array, k: int, chunk: int = TOPK_CHUNK
               ) -> tuple[jax.Array, jax.Array]:
  """Exact, stable top-k of each row of `s` [q, n] via chunk maxima.

  The row is cut into n / chunk chunks; the k chunks of largest maximum hold
  the top k (each element outside them is below k distinct chunk maxima, so
  below the k-th value). With ties: lax.top_k prefers lower chunk indices,
  and the chunks are gathered in increasing index order, so equal scores come
  out by lower position, exactly as lax.top_k(s, k) orders them. This replaces
  a partial sort over n by one over n / chunk and one over k * chunk (XLA:CPU's
  top_k is a single-threaded partial sort per row, far slower than the matmul).

  Returns:
    (values [q, k] descending, positions [q, k] int32 in [0, n)).
  """
  q, n = s.shape
  if n // chunk < k or k * chunk >= n:
    vals, pos = jax.lax.top_k(s, k)
    return vals, pos.astype(jnp.int32)
  if n % chunk:   # -inf tail: never before a real entry (stable, k <= n)
    s = jnp.pad(s, ((0, 0), (0, -n % chunk)), constant_values=-jnp.inf)
    n = s.shape[1]
  chunk_max = jnp.max(s.reshape(q, n // chunk, chunk), axis=2)
  _, best = jax.lax.top_k(chunk_max, k)
  best = jnp.sort(best, axis=1)                                   # index order
  cand_pos = (best[:, :, None] * chunk + jnp.arange(chunk)).reshape(q, k * chunk)
  cand = jnp.take_along_axis(s, cand_pos, axis=1)
  vals, pos = jax.lax.top_k(cand, k)
  return vals, jnp.take_along_axis(cand_pos, pos, axis=1).astype(jnp.int32)


@functools.partial(jax.jit,
                   static_argnames=('k', 'mesh', 'block_size', 'axis_name',
                                    'gallery_block_size'))
def gallery_topk(query_emb: jax.Array,
                 gallery_emb: jax.Array,
                 k: int,
                 mesh: Mesh,
                 *,
                 exclude_index: Optional[jax.Array] = None,
                 block_size: int = 1024,
                 gallery_valid: Optional[jax.Array] = None,
                 axis_name: str = 'data',
                 gallery_block_size: int = GALLERY_BLOCK
                ) -> tuple[jax.Array, jax.Array]:
  """Exact top-k gallery items per query with the gallery sharded.

  Each device loops over blocks of its gallery shard (lax.scan) and, inside,
  over query blocks (lax.map): a [block_size, gallery_block_size] score
  block is reduced to its exact top-k (`_block_topk`) and merged into that
  query block's running top-k, so the scores held at a time are bounded by
  the two block sizes, not by Q x G (peak memory O(G d) for the gallery
  itself plus O(Q k)); each gallery block is read once per query block. One
  all-gather of the [Q, k] per-shard candidates is merged with a second
  top-k. lax.top_k is stable, running candidates (lower gallery ids) come
  first in every merge and shards hold contiguous, increasing gallery ranges,
  so equal scores come out by lower gallery index.

  Args:
    query_emb: [Q, d] query embeddings (padded to a multiple of the block
      size internally; the result is sliced back to Q).
    gallery_emb: [G, d] gallery embeddings, ideally from `shard_gallery`;
      padded here otherwise.
    k: number of results, k <= G.
    mesh: mesh whose `axis_name` axis shards the gallery (a one-device mesh
      works).
    exclude_index: optional [Q] int gallery index to mask out per query (the
      reference image), -1 for none.
    block_size: queries per block.
    gallery_valid: optional [G] bool; False rows are never retrieved.
    axis_name: mesh axis for the gallery shards.
    gallery_block_size: gallery rows per score block (per device).

  Returns:
    (scores [Q, k] float32 descending, indices [Q, k] int32). Slots left
    when fewer than k valid items exist have score -inf and index -1.
  """
  num_devices = _axis_size(mesh, axis_name)
  num_gallery = gallery_emb.shape[0]
  if not 1 <= k <= num_gallery:
    raise ValueError(f'gallery_topk: k={k} must be in [1, G={num_gallery}]')
  if gallery_valid is None:
    gallery_valid = jnp.ones((num_gallery,), bool)
  if num_gallery % num_devices:
    gallery_emb, _ = pad_to_multiple(gallery_emb, num_devices)
    gallery_valid, _ = pad_to_multiple(gallery_valid, num_devices, fill=False)
  g_local = gallery_emb.shape[0] // num_devices
  k_local = min(k, g_local)
  # Gallery blocks: as few as fit in gallery_block_size, of equal size (a
  # multiple of TOPK_CHUNK), the last one shifted back to end at the shard's
  # end (its rows seen before are masked), so the gallery is never copied.
  g_block = -(-g_local // -(-g_local // gallery_block_size))
  g_block = min(-(-g_block // TOPK_CHUNK) * TOPK_CHUNK, g_local)
  num_gblocks = -(-g_local // g_block)
  k_block = min(k_local, g_block)

  num_queries = query_emb.shape[0]
  block = min(block_size, num_queries)
  if exclude_index is None:
    exclude_index = jnp.full((num_queries,), -1, jnp.int32)
  queries, _ = pad_to_multiple(query_emb, block)
  excluded, _ = pad_to_multiple(exclude_index.astype(jnp.int32), block, -1)
  queries = queries.reshape(-1, block, queries.shape[-1])
  excluded = excluded.reshape(-1, block)

  def per_device(q_blocks, ex_blocks, gallery, valid):
    offset = jax.lax.axis_index(axis_name) * g_local

    def gallery_step(carry, i):
      start = jnp.minimum(i * g_block, g_local - g_block)
      gb = jax.lax.dynamic_slice_in_dim(gallery, start, g_block)
      rows = start + jnp.arange(g_block, dtype=jnp.int32)
      vb = jax.lax.dynamic_slice_in_dim(valid, start, g_block) & (rows >= i * g_block)
      ids = offset + rows

      def one_query_block(args):
        qb, eb, run_vals, run_idx = args
        keep = vb[None, :] & (ids[None, :] != eb[:, None])
        vals, pos = _block_topk(jnp.where(keep, _scores(qb, gb), -jnp.inf), k_block)
        # Running candidates (lower gallery ids) first: stable on ties.
        vals = jnp.concatenate([run_vals, vals], axis=1)
        idx = jnp.concatenate([run_idx, ids[pos]], axis=1)
        vals, pos = jax.lax.top_k(vals, k_local)
        return vals, jnp.take_along_axis(idx, pos, axis=1)

      return jax.lax.map(one_query_block, (q_blocks, ex_blocks) + carry), None

    shape = q_blocks.shape[:2] + (k_local,)
    init = jax.lax.pcast((jnp.full(shape, -jnp.inf, jnp.float32),
                          jnp.full(shape, -1, jnp.int32)), (axis_name,), to='varying')
    (vals, idx), _ = jax.lax.scan(gallery_step, init,
                                  jnp.arange(num_gblocks, dtype=jnp.int32))
    # Shard-major concatenation keeps equal scores in gallery-index order.
    vals = jax.lax.all_gather(vals, axis_name, axis=2, tiled=True,
                              to='invarying')
    idx = jax.lax.all_gather(idx, axis_name, axis=2, tiled=True,
                             to='invarying')
    top_vals, pos = jax.lax.top_k(vals, k)
    top_idx = jnp.take_along_axis(idx, pos, axis=2)
    return top_vals, jnp.where(top_vals == -jnp.inf, -1, top_idx)

  vals, idx = jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(P(), P(), P(axis_name), P(axis_name)),
      out_specs=P())(queries, excluded, gallery_emb, gallery_valid)
  return (vals.reshape(-1, k)[:num_queries], idx.reshape(-1, k)[:num_queries])


def recall_at_k(topk_indices: jax.Array,
                gallery_labels: jax.Array,
                target_labels: jax.Array,
                ks: Sequence[int],
                query_valid: Optional[jax.Array] = None
               ) -> dict[str, jax.Array]:
  """Recall@K from retrieved ids, with target sets or single targets.

  A query is a hit at K if any of its first K retrieved gallery items has
  the query's target label. Target sets (CSS / Fashion200k / MIT-States: all
  gallery images sharing the target's caption or class) use that shared id
  as label; single targets (CIRR / FashionIQ) use the gallery index as label.

  Args:
    topk_indices: [Q, k] gallery ids from `gallery_topk` (-1 = empty slot).
    gallery_labels: [G] int label of every gallery item.
    target_labels: [Q] int label of each query's target (set).
    ks: K values, each <= k.
    query_valid: optional [Q] bool; padded queries (False) never count.

  Returns:
    {'R@K': scalar float32 percent (0-100)}.
  """
  k = topk_indices.shape[1]
  if max(ks) > k:
    raise ValueError(f'recall_at_k: K={max(ks)} exceeds the {k} retrieved ids')
  if query_valid is None:
    query_valid = jnp.ones(topk_indices.shape[:1], bool)
  labels = jnp.take(gallery_labels, jnp.maximum(topk_indices, 0), axis=0)
  match = (labels == target_labels[:, None]) & (topk_indices >= 0)
  # hit@K = any match among the first K: a running OR along the ranking.
  first_match = jnp.argmax(match, axis=1)
  any_match = jnp.any(match, axis=1)
  return {f'R@{kk}': _percent(any_match & (first_match < kk), query_valid)
          for kk in ks}


def _candidate_scores(query_emb, gallery_emb, candidate_index, mesh,
                      axis_name):
  """[Q, S] dot products of queries with their candidates' embeddings.

  With a mesh, each device scores the candidates that live on its gallery
  shard and a psum assembles the rows, so the gallery is never replicated.
  """
  safe = jnp.maximum(candidate_index, 0)
  if mesh is None:
    emb = jnp.take(gallery_emb, safe, axis=0)
    return jnp.einsum('qd,qsd->qs', query_emb, emb,
                      preferred_element_type=jnp.float32)
  num_devices = _axis_size(mesh, axis_name)
  if gallery_emb.shape[0] % num_devices:
    gallery_emb, _ = pad_to_multiple(gallery_emb, num_devices)
  g_local = gallery_emb.shape[0] // num_devices

  def per_device(q, cand, gallery):
    local = cand - jax.lax.axis_index(axis_name) * g_local
    mine = (local >= 0) & (local < g_local)
    emb = jnp.take(gallery, jnp.clip(local, 0, g_local - 1), axis=0)
    s = jnp.einsum('qd,qsd->qs', q, emb, preferred_element_type=jnp.float32)
    return jax.lax.psum(jnp.where(mine, s, 0.0), axis_name)

  return jax.shard_map(per_device, mesh=mesh,
                       in_specs=(P(), P(), P(axis_name)),
                       out_specs=P())(query_emb, safe, gallery_emb)


def _check_subset_targets(candidate_index, target_index, query_valid):
  """Host-side check (concrete inputs only): each target is a candidate."""
  if any(isinstance(x, jax.core.Tracer)
         for x in (candidate_index, target_index, query_valid)):
    return
  cand = np.asarray(candidate_index)
  tgt = np.asarray(target_index)
  valid = (np.ones(tgt.shape, bool) if query_valid is None
           else np.asarray(query_valid))
  missing = valid & ~np.any((cand == tgt[:, None]) & (cand >= 0), axis=1)
  if missing.any():
    q = int(np.flatnonzero(missing)[0])
    raise ValueError(
        f'subset_recall: target {int(tgt[q])} of query {q} is not among its '
        f'candidates {cand[q].tolist()} ({int(missing.sum())} such queries)')


def subset_recall(query_emb: jax.Array,
                  gallery_emb: jax.Array,
                  candidate_index: jax.Array,
                  target_index: jax.Array,
                  ks: Sequence[int] = (1, 2, 3),
                  query_valid: Optional[jax.Array] = None,
                  mesh: Optional[Mesh] = None,
                  axis_name: str = 'data') -> dict[str, jax.Array]:
  """CIRR Recall_subset@K: rank only each query's image-set candidates.

  The caller builds the candidate list: the members of the query's image set
  minus the reference (CIRR's img_set.members \\ {I_R}), padded with -1. The
  target is ranked among them with the module's stable rank.

  Args:
    query_emb: [Q, d] query embeddings.
    gallery_emb: [G, d] gallery embeddings (may be sharded/padded by
      `shard_gallery`; pass the same `mesh`).
    candidate_index: [Q, S] int gallery ids, -1 = padding.
    target_index: [Q] int gallery id of each query's target; must be among
      its candidates (checked when the inputs are concrete; inside jit a
      missing target counts as a miss).
    ks: K values.
    query_valid: optional [Q] bool; padded queries never count.
    mesh: mesh sharding the gallery, or None for a single device.
    axis_name: gallery axis of `mesh`.

  Returns:
    {'R_subset@K': scalar float32 percent (0-100)}.
  """
  _check_subset_targets(candidate_index, target_index, query_valid)
  if query_valid is None:
    query_valid = jnp.ones(target_index.shape, bool)
  s = _candidate_scores(query_emb, gallery_emb, candidate_index, mesh,
                        axis_name)
  cand_valid = candidate_index >= 0
  is_target = (candidate_index == target_index[:, None]) & cand_valid
  target_score = jnp.max(jnp.where(is_target, s, -jnp.inf), axis=1)
  rank = _stable_rank(s, target_score, candidate_index, target_index,
                      cand_valid & ~is_target)
  found = jnp.any(is_target, axis=1)
  return {f'R_subset@{k}': _percent(found & (rank < k), query_valid)
          for k in ks}


@functools.partial(
    jax.jit, static_argnames=('ks', 'mesh', 'return_topk', 'block_size',
                              'subset_ks', 'axis_name'))
def _evaluate(query_emb, gallery_emb, gallery_labels, target_labels,
              exclude_index, query_valid, gallery_valid, subset_candidates,
              subset_target, *, ks, mesh, return_topk, block_size, subset_ks,
              axis_name):
  k = max(max(ks), return_topk)
  _, top_idx = gallery_topk(query_emb, gallery_emb, k, mesh,
                            exclude_index=exclude_index,
                            block_size=block_size,
                            gallery_valid=gallery_valid,
                            axis_name=axis_name)
  metrics = recall_at_k(top_idx, gallery_labels, target_labels, ks,
                        query_valid)
  if subset_candidates is not None:
    metrics.update(subset_recall(query_emb, gallery_emb, subset_candidates,
                                 subset_target, subset_ks, query_valid,
                                 mesh, axis_name))
  return metrics, top_idx[:, :return_topk]


def evaluate_retrieval(query_emb: jax.Array,
                       gallery_emb: jax.Array,
                       gallery_labels: jax.Array,
                       target_labels: jax.Array,
                       exclude_index: Optional[jax.Array] = None,
                       ks: Sequence[int] = (1, 5, 10, 50),
                       mesh: Optional[Mesh] = None,
                       return_topk: int = 0,
                       *,
                       query_valid: Optional[jax.Array] = None,
                       gallery_valid: Optional[jax.Array] = None,
                       subset_candidates: Optional[jax.Array] = None,
                       subset_target: Optional[jax.Array] = None,
                       subset_ks: Sequence[int] = (1, 2, 3),
                       block_size: int = 1024,
                       axis_name: str = 'data'):
  """Gallery Recall@K (+ optional Recall_subset@K), one host transfer.

  Everything runs in one jitted computation; the only device->host copy is
  the final metrics dict (and the top ids when `return_topk` > 0).

  Args:
    query_emb: [Q, d] query embeddings.
    gallery_emb: [G, d] gallery embeddings (ideally from `shard_gallery`).
    gallery_labels: [G] int labels (gallery index for single targets; set id
      for target sets). May be shorter than a padded gallery: padded rows are
      never retrieved.
    target_labels: [Q] int target label per query.
    exclude_index: optional [Q] gallery id to exclude per query (-1 = none),
      e.g. the reference image.
    ks: K values for Recall@K.
    mesh: mesh sharding the gallery; None uses a one-device mesh.
    return_topk: also return the first `return_topk` gallery ids per query.
    query_valid: optional [Q] bool; padded queries never count.
    gallery_valid: optional [G] bool; invalid rows are never retrieved.
    subset_candidates: optional [Q, S] ids for Recall_subset (-1 = padding).
    subset_target: [Q] target gallery ids, required with subset_candidates.
    subset_ks: K values for Recall_subset@K.
    block_size: queries scored per block.
    axis_name: gallery axis of `mesh`.

  Returns:
    {'R@K': float, ['R_subset@K': float]} as Python floats (percent), and,
    if return_topk > 0, a tuple (metrics, ids) with ids a [Q, return_topk]
    numpy int array (-1 for empty slots).
  """
  if (subset_candidates is None) != (subset_target is None):
    raise ValueError('evaluate_retrieval: pass subset_candidates and '
                     'subset_target together')
  if subset_candidates is not None:
    _check_subset_targets(subset_candidates, subset_target, query_valid)
  if mesh is None:
    mesh = sharding.single_device_mesh(axis_name)
  metrics, ids = _evaluate(
      query_emb, gallery_emb, gallery_labels, target_labels, exclude_index,
      query_valid, gallery_valid, subset_candidates, subset_target,
      ks=tuple(ks), mesh=mesh, return_topk=return_topk, block_size=block_size,
      subset_ks=tuple(subset_ks), axis_name=axis_name)
  if return_topk:
    metrics, ids = jax.device_get((metrics, ids))
    return {key: float(v) for key, v in metrics.items()}, ids
  return {key: float(v) for key, v in jax.device_get(metrics).items()}
