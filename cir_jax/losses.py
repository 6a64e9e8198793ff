"""Metric-learning losses for composed image retrieval.

Every loss is a pure function of explicit arrays and shares one convention:

  query:          [b, d] composed query embeddings psi_i (the caller has already
                  L2-normalised them and multiplied by the learnable scale).
  candidates:     [n, d] target-image embeddings phi_j, same treatment.
  positive_index: [b] int, index into `candidates` of each query's target.

Losses return a scalar float32 mean. `global_batch_loss` wraps any of them so
that, inside a jitted step whose inputs are global arrays sharded along the
batch axis, each device scores its local queries against the all-gathered
targets of the whole global batch.

Equations refer to Vo et al., "Composing Text and Image for Image Retrieval -
An Empirical Odyssey" (TIRG, CVPR 2019), section 3.3.
"""

import dataclasses
import functools
import itertools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

KERNELS = ('dot', 'neg_sq_l2')

# Exhaustive enumeration in `general_k_loss` builds a [b, M, K] index tensor;
# past this many sets that is a memory bug, not a loss.
_MAX_ENUMERATED_SETS = 100_000


def similarity(query: jax.Array, candidates: jax.Array,
               kernel: str = 'dot') -> jax.Array:
  """Similarity kernel kappa(psi_i, phi_j) of Eq. 4-6 for all pairs.

  Args:
    query: [b, d] query embeddings.
    candidates: [n, d] candidate embeddings.
    kernel: 'dot' (inner product) or 'neg_sq_l2' (negative squared Euclidean
      distance). The paper says "negative l2 distance"; google/tirg's code uses
      the squared distance, which is what 'neg_sq_l2' computes.

  Returns:
    [b, n] float32 similarities.
  """
  if kernel not in KERNELS:
    raise ValueError(f'unknown kernel {kernel!r}; valid kernels: {KERNELS}')
  dots = jnp.einsum('bd,nd->bn', query, candidates,
                    preferred_element_type=jnp.float32)
  if kernel == 'dot':
    return dots
  # The expansion keeps memory at [b, n] instead of the [b, n, d] difference
  # tensor; the cancellation error is ~1e-6 relative for unit-scale inputs.
  q_sq = jnp.sum(jnp.square(query.astype(jnp.float32)), axis=-1)
  c_sq = jnp.sum(jnp.square(candidates.astype(jnp.float32)), axis=-1)
  return 2.0 * dots - q_sq[:, None] - c_sq[None, :]


def _positive_scores(logits: jax.Array, positive_index: jax.Array) -> jax.Array:
  """[b, n] logits, [b] indices -> [b] logit of each row's positive."""
  return jnp.take_along_axis(logits, positive_index[:, None], axis=1)[:, 0]


def soft_triplet_loss(query: jax.Array,
                      candidates: jax.Array,
                      positive_index: jax.Array,
                      kernel: str = 'neg_sq_l2',
                      weights: Optional[jax.Array] = None,
                      set_negatives: Optional[jax.Array] = None,
                      set_negative_mask: Optional[jax.Array] = None) -> jax.Array:
  """Soft triplet loss, TIRG Eq. 5 (Eq. 4 with K=2 and M=n-1).

  L = 1/(M b) sum_i sum_{j != pos_i} log(1 + exp(k(psi_i, phi_j) -
  k(psi_i, phi_pos_i))), i.e. every anchor against every non-positive
  candidate, as the paper prescribes for K=2 ("we choose M = B - 1").

  Differences from google/tirg's PyTorch code, on purpose: its hand-written
  soft-triplet backward returns exactly 0.5x the true gradient, and it samples
  only 3 triplets per anchor over the concatenated [queries; targets] set. Here
  the gradient is autodiff's (the true one) and all n-1 negatives are used.
  With the 0.5x factor gone, a learning rate tuned for google/tirg corresponds
  to half of it here.

  Args:
    query: [b, d] query embeddings.
    candidates: [n, d] target embeddings, n >= 2.
    positive_index: [b] int, index of each query's positive in `candidates`.
    kernel: 'neg_sq_l2' (google/tirg's choice) or 'dot'.
    weights: optional [b] non-negative per-query weights (e.g. 0 for padded
      queries); the result is the weighted mean over anchors.
    set_negatives: optional [b, S, d] extra negatives of each query alone, our
      extension (config loss.set_negatives; neither CIRPLANT's paper nor its code
      uses them: there the CIRR image-set members are only positives): members
      of the query's CIRR image set that are not its reference, its target or
      graded a partial match (target_soft > 0; cir_jax.data.pipeline
      .set_negative_rows picks them). Each is one more triplet for its anchor:
      anchor i averages over its n - 1 + S_i negatives, S_i = its valid members.
    set_negative_mask: [b, S] bool, which `set_negatives` are real (padding is
      False).

  Returns:
    Scalar float32 loss.
  """
  n = candidates.shape[0]
  if n < 2:
    raise ValueError(f'soft_triplet_loss needs n >= 2 candidates, got {n}')
  logits = similarity(query, candidates, kernel)
  positive = _positive_scores(logits, positive_index)
  # softplus(x) = log(1 + exp(x)) without overflow for large margins.
  terms = jax.nn.softplus(logits - positive[:, None])
  not_positive = jnp.arange(n)[None, :] != positive_index[:, None]
  total = jnp.sum(jnp.where(not_positive, terms, 0.0), axis=1)
  count = jnp.full(total.shape, n - 1, jnp.float32)
  if set_negatives is not None:
    if set_negative_mask is None:
      raise ValueError('soft_triplet_loss: set_negatives needs set_negative_mask')
    extra = jax.vmap(lambda q, e: similarity(q[None], e, kernel)[0])(query, set_negatives)
    extra_terms = jax.nn.softplus(extra - positive[:, None])
    total += jnp.sum(jnp.where(set_negative_mask, extra_terms, 0.0), axis=1)
    count += jnp.sum(set_negative_mask, axis=1).astype(jnp.float32)
  per_anchor = total / count
  if weights is None:
    return jnp.mean(per_anchor)
  weights = weights.astype(jnp.float32)
  return jnp.sum(weights * per_anchor) / jnp.maximum(jnp.sum(weights), 1e-12)


def batch_classification_loss(query: jax.Array,
                              candidates: jax.Array,
                              positive_index: jax.Array,
                              kernel: str = 'dot') -> jax.Array:
  """Batch-based classification loss, TIRG Eq. 6 (Eq. 4 with K=B, M=1).

  L = -1/b sum_i log softmax_j(k(psi_i, phi_j))[pos_i]: softmax cross-entropy
  of each query over all n candidates.

  Args:
    query: [b, d] query embeddings.
    candidates: [n, d] target embeddings.
    positive_index: [b] int, index of each query's positive in `candidates`.
    kernel: 'dot' or 'neg_sq_l2'.

  Returns:
    Scalar float32 loss.
  """
  logits = similarity(query, candidates, kernel)
  log_probs = jax.nn.log_softmax(logits, axis=1)
  return -jnp.mean(_positive_scores(log_probs, positive_index))


def _enumerate_negative_sets(n_neg: int, k_minus_1: int) -> np.ndarray:
  """All (n_neg choose k-1) sets of negative ranks, as an [M, K-1] array."""
  count = math.comb(n_neg, k_minus_1)
  if count > _MAX_ENUMERATED_SETS:
    raise ValueError(
        f'enumerating all {count} negative sets (n-1={n_neg} choose K-1='
        f'{k_minus_1}) exceeds {_MAX_ENUMERATED_SETS}; pass m=<int> to sample')
  return np.array(list(itertools.combinations(range(n_neg), k_minus_1)),
                  dtype=np.int32).reshape(count, k_minus_1)


def negative_sets(positive_index: jax.Array, n: int, k: int,
                  m: Optional[int], rng: Optional[jax.Array]) -> jax.Array:
  """Candidate indices of the K-1 negatives of each set N_i^m of Eq. 4.

  Args:
    positive_index: [b] int, each query's positive among n candidates.
    n: number of candidates.
    k: set size K (one positive + K-1 negatives), 2 <= K <= n.
    m: sets per query; None enumerates all C(n-1, K-1) sets in
      lexicographic order (identical for every query up to the skipped
      positive).
    rng: PRNG key, required when `m` is an int.

  Returns:
    [b, M, K-1] int32 candidate indices, never the query's positive and
    distinct within a set; with an int m each set is a uniformly random
    (K-1)-subset, independent across sets and queries.
  """
  if not 2 <= k <= n:
    raise ValueError(f'general_k_loss needs 2 <= k <= n={n}, got k={k}')
  b = positive_index.shape[0]
  if m is None:
    ranks = jnp.asarray(_enumerate_negative_sets(n - 1, k - 1))
    ranks = jnp.broadcast_to(ranks, (b,) + ranks.shape)
  else:
    if m < 1:
      raise ValueError(f'general_k_loss needs m >= 1 or None, got m={m}')
    if rng is None:
      raise ValueError('general_k_loss with an integer m needs an rng key')
    # Top-(K-1) of i.i.d. uniforms is a uniformly random (K-1)-subset: a
    # without-replacement draw that vectorises over queries and sets.
    noise = jax.random.uniform(rng, (b, m, n - 1))
    _, ranks = jax.lax.top_k(noise, k - 1)
  # Ranks index the n-1 non-positive candidates; shift past the positive.
  pos = positive_index[:, None, None]
  return (ranks + (ranks >= pos)).astype(jnp.int32)


def general_k_loss(query: jax.Array,
                   candidates: jax.Array,
                   positive_index: jax.Array,
                   k: int,
                   m: Optional[int],
                   rng: Optional[jax.Array],
                   kernel: str = 'dot') -> jax.Array:
  """General softmax loss over sampled sets, TIRG Eq. 4.

  For each query i, M sets N_i^m hold the positive plus K-1 distinct negatives
  drawn from the other n-1 candidates (without replacement within a set,
  independently across sets). L = -1/(M b) sum_i sum_m log softmax over N_i^m
  of the positive. K=2 with all n-1 sets is Eq. 5 (soft triplet) and K=n with
  M=1 is Eq. 6 (batch classification), exactly.

  Args:
    query: [b, d] query embeddings.
    candidates: [n, d] target embeddings.
    positive_index: [b] int, index of each query's positive in `candidates`.
    k: set size K, 2 <= K <= n.
    m: number of sampled sets M per query; None enumerates every possible
      set, M = C(n-1, K-1) ("to evaluate every possible set"; the paper
      quotes the looser bound C(B, K)).
    rng: PRNG key used when `m` is an int; ignored (may be None) when None.
    kernel: 'dot' or 'neg_sq_l2'.

  Returns:
    Scalar float32 loss.
  """
  negatives = negative_sets(positive_index, candidates.shape[0], k, m, rng)
  logits = similarity(query, candidates, kernel)
  neg_logits = jnp.take_along_axis(
      logits[:, None, :], negatives, axis=2)  # [b, M, K-1]
  pos_logits = _positive_scores(logits, positive_index)[:, None, None]
  set_logits = jnp.concatenate(
      [jnp.broadcast_to(pos_logits, neg_logits.shape[:2] + (1,)), neg_logits],
      axis=2)
  return -jnp.mean(jax.nn.log_softmax(set_logits, axis=2)[..., 0])


def _safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt with a finite (zero) gradient at 0, where d sqrt/dx is infinite."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def batch_hard_triplet_loss(query: jax.Array,
                            candidates: jax.Array,
                            positive_index: jax.Array,
                            margin: float,
                            query_labels: Optional[jax.Array] = None,
                            candidate_labels: Optional[jax.Array] = None
                           ) -> jax.Array:
  """Batch-hard triplet loss (Hermans et al. 2017, as used for CIR).

  With Euclidean (not squared) distance d: for each anchor i, the hardest
  positive is the farthest candidate with the anchor's label, the hardest
  negative the closest candidate with a different label, and
  L = mean_i relu(d(psi_i, hardest_pos) - d(psi_i, hardest_neg) + margin).

  Without labels, each query's only positive is `positive_index` and all other
  candidates are negatives. With labels, the positives are the candidates
  sharing the query's label, plus `positive_index` itself (the annotated target
  is always a positive). Anchors with no negative at all (every candidate
  shares their label) have no triplet and are left out of the mean; if no
  anchor has one the loss is 0.

  Args:
    query: [b, d] query embeddings.
    candidates: [n, d] target embeddings.
    positive_index: [b] int, index of each query's positive in `candidates`.
    margin: triplet margin alpha.
    query_labels: optional [b] int labels (e.g. target caption ids).
    candidate_labels: optional [n] int labels; give both or neither.

  Returns:
    Scalar float32 loss.
  """
  if (query_labels is None) != (candidate_labels is None):
    raise ValueError('batch_hard_triplet_loss: pass both query_labels and '
                     'candidate_labels, or neither')
  n = candidates.shape[0]
  dist = _safe_sqrt(-similarity(query, candidates, 'neg_sq_l2'))
  is_pos = jnp.arange(n)[None, :] == positive_index[:, None]
  if query_labels is not None:
    is_pos = is_pos | (candidate_labels[None, :] == query_labels[:, None])
  hardest_pos = jnp.max(jnp.where(is_pos, dist, -jnp.inf), axis=1)
  hardest_neg = jnp.min(jnp.where(is_pos, jnp.inf, dist), axis=1)
  has_neg = jnp.any(~is_pos, axis=1)
  # The where() keeps inf - inf out of anchors that have no negative.
  terms = jnp.where(
      has_neg,
      jax.nn.relu(hardest_pos - jnp.where(has_neg, hardest_neg, 0.0) + margin),
      0.0)
  return jnp.sum(terms) / jnp.maximum(jnp.sum(has_neg), 1)


def temperature_cross_entropy(query: jax.Array,
                              candidates: jax.Array,
                              positive_index: jax.Array,
                              temperature: float | jax.Array,
                              bidirectional: bool = False) -> jax.Array:
  """CLIP-style InfoNCE with logits = q . c / temperature.

  The query->target direction is Eq. 6 with a dot kernel divided by the
  temperature. The bidirectional variant averages it with the target->query
  direction: for each query i, its positive candidate pos_i classifies over
  the b queries (column pos_i of the logits), with i as the correct class.
  That is only a proper softmax when every candidate is the positive of at
  most one query (distinct `positive_index`), as in the usual 1:1 batch where
  candidates[j] is the target of query j; candidates that are nobody's
  positive add negatives to the query->target direction only. Across devices
  use `global_batch_loss(..., symmetric=True)` instead, which gathers both
  sides.

  Args:
    query: [b, d] query embeddings (normalised, NOT scaled: the temperature
      is the scale here).
    candidates: [n, d] target embeddings.
    positive_index: [b] int, index of each query's positive in `candidates`;
      must be distinct when `bidirectional`.
    temperature: positive scalar tau.
    bidirectional: also add the target->query direction (mean of the two).

  Returns:
    Scalar float32 loss.
  """
  logits = similarity(query, candidates, 'dot') / temperature
  forward = -jnp.mean(
      _positive_scores(jax.nn.log_softmax(logits, axis=1), positive_index))
  if not bidirectional:
    return forward
  # Column softmax over queries; entry [i, pos_i] is target pos_i -> query i.
  col_log_probs = jax.nn.log_softmax(logits, axis=0)
  backward = -jnp.mean(_positive_scores(col_log_probs, positive_index))
  return 0.5 * (forward + backward)


def ssn_loss(query: jax.Array,
             candidates: jax.Array,
             positive_index: jax.Array,
             negative_query: Optional[jax.Array] = None,
             temperature: float | jax.Array = 0.01,
             kl_weight: float = 1.0) -> jax.Array:
  """SSN's objective, Eq. 7-9 of "Decompose Semantic Shifts for CIR" (AAAI 2024).

  Eq. 7, the batch classification loss of the positive branch (its composed
  queries psi+ against the targets, logits = psi+ . phi / tau):
    L_ce = -1/b sum_i log softmax_j(psi+_i . phi_j / tau)[pos_i].
  Eq. 8, the regulariser: with P+_i = softmax_j(psi+_i . phi_j / tau) and P-_i
  the same for the negative branch (negative guiding text + discarded image
  tokens), L_kl = -1/b sum_i KL(P+_i || P-_i); minimising it pushes the two
  similarity distributions apart ("we aim to push away the distance").
  Eq. 9: L = L_ce + kl_weight * L_kl.

  The authors' code differs (see cir_jax/models/composers/ssn.py): it averages
  the CE over both directions, divides the KL by b*b (torch's 'mean'), and adds
  KL(softmax(I/tau) || P+). Here the paper's form is used.

  Args:
    query: [b, d] positive-branch queries (normalised, NOT scaled).
    candidates: [n, d] target embeddings.
    positive_index: [b] int, index of each query's positive in `candidates`.
    negative_query: [b, d] negative-branch queries, or None (CE only, e.g.
      the SSN ablation without decomposition).
    temperature: tau (0.01 = CLIP's logit scale 100).
    kl_weight: lambda of Eq. 9.

  Returns:
    Scalar float32 loss.
  """
  log_p_pos = jax.nn.log_softmax(similarity(query, candidates, 'dot') / temperature, axis=1)
  loss = -jnp.mean(_positive_scores(log_p_pos, positive_index))
  if negative_query is None or kl_weight == 0:
    return loss
  log_p_neg = jax.nn.log_softmax(
      similarity(negative_query, candidates, 'dot') / temperature, axis=1)
  kl = jnp.mean(jnp.sum(jnp.exp(log_p_pos) * (log_p_pos - log_p_neg), axis=1))
  return loss - kl_weight * kl


def global_batch_loss(loss_fn: Callable[..., jax.Array],
                      query: jax.Array,
                      target: jax.Array,
                      mesh: Mesh,
                      axis_name: str = 'data',
                      negatives: str = 'global',
                      symmetric: bool = False,
                      per_query: Optional[dict] = None,
                      **kw) -> jax.Array:
  """Any loss above over the global batch, with an explicit all-gather.

  For use inside a jitted step whose `query` and `target` are global arrays
  sharded along axis 0 over `axis_name` of `mesh`; query j's positive is
  target j. With negatives='global', each device all-gathers the targets and
  scores its b_local queries against all B targets (logits B x b_local per
  device, never B x B), positive_index = axis_index * b_local + arange. With
  'local' it uses only its own b_local targets (the per-device loss some
  papers report). Gradients flow back through the gather: its transpose is a
  reduce-scatter, so each device receives the gradient for its own targets
  from every device's queries.

  The result is pmean over devices of the per-device loss. For losses that
  are a plain mean over anchors with the same number of terms per anchor
  (all except batch_hard_triplet_loss with labels, whose anchors without a
  negative drop out) this equals the loss of the concatenated global batch.

  Args:
    loss_fn: a loss of this module, called as
      loss_fn(query, candidates, positive_index, **kw).
    query: [B, d] global query embeddings, B divisible by the axis size.
    target: [B, d] global target embeddings.
    mesh: the mesh the arrays are sharded on.
    axis_name: the batch axis of `mesh`.
    negatives: 'global' (all B targets) or 'local' (this device's targets).
    symmetric: also gather the queries and add the target->query direction,
      loss_fn(target_local, query_all, ...), averaging the two (CLIP's
      bidirectional loss across devices). Requires a symmetric kernel, which
      all of ours are.
    per_query: optional dict of [B, ...] arrays sharded like `query` (e.g.
      SSN's negative-branch queries); each device passes its local rows to
      loss_fn under the dict's keys. Not combinable with `symmetric`.
    **kw: extra keyword arguments of loss_fn; array values are passed
      replicated. A key named `rng` is folded with the device index so
      samplers draw independently per device.

  Returns:
    Replicated scalar float32: the global mean loss.
  """
  if negatives not in ('global', 'local'):
    raise ValueError(
        f"negatives must be 'global' or 'local', got {negatives!r}")
  if kw.get('bidirectional'):
    raise ValueError('global_batch_loss: bidirectional=True would only see the '
                     'local queries in the reverse direction; pass '
                     'symmetric=True instead')
  num_devices = mesh.shape[axis_name]
  batch = query.shape[0]
  if target.shape[0] != batch:
    raise ValueError(f'query batch {batch} != target batch {target.shape[0]}')
  if batch % num_devices:
    raise ValueError(
        f'global batch size {batch} is not divisible by the {num_devices} '
        f"devices of mesh axis '{axis_name}'; choose a batch size that is a "
        f'multiple of {num_devices}')
  b_local = batch // num_devices
  per_query = dict(per_query or {})
  if per_query and symmetric:
    raise ValueError('global_batch_loss: per_query arrays belong to the query '
                     'side; symmetric=True would pass them to the target side')
  for key, value in per_query.items():
    if value.shape[0] != batch:
      raise ValueError(f'per_query[{key!r}] has {value.shape[0]} rows, expected '
                       f'the batch {batch}')

  array_kw = {key: v for key, v in kw.items()
              if isinstance(v, (jax.Array, np.ndarray))}
  static_kw = {key: v for key, v in kw.items() if key not in array_kw}

  def per_device(q, t, arrays, rows):
    arrays = dict(arrays, **rows)
    if 'rng' in arrays and arrays['rng'] is not None:
      arrays['rng'] = jax.random.fold_in(arrays['rng'],
                                         jax.lax.axis_index(axis_name))
    fn = functools.partial(loss_fn, **static_kw, **arrays)
    if negatives == 'local':
      local = jnp.arange(b_local)
      loss = fn(q, t, local)
      if symmetric:
        loss = 0.5 * (loss + fn(t, q, local))
    else:
      own = jax.lax.axis_index(axis_name) * b_local + jnp.arange(b_local)
      loss = fn(q, jax.lax.all_gather(t, axis_name, tiled=True), own)
      if symmetric:
        loss = 0.5 * (
            loss + fn(t, jax.lax.all_gather(q, axis_name, tiled=True), own))
    return jax.lax.pmean(loss, axis_name)

  sharded = jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(P(axis_name), P(axis_name), P(), P(axis_name)),
      out_specs=P())
  return sharded(query, target, array_kw, per_query)


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """How the trainer calls one loss of this module.

  fn: the loss function.
  options: `config.loss` -> the keyword arguments fn reads (besides the arrays).
  query_inputs: keys of the model's aux dict passed per query (sharded like the
    queries, see `global_batch_loss(per_query=...)`).
  takes_rng: the loss samples (Eq. 4's sets) and takes an `rng`.
  """
  fn: Callable[..., jax.Array]
  options: Callable[[Any], dict]
  query_inputs: tuple[str, ...] = ()
  takes_rng: bool = False


# config.loss.name -> LossSpec: the one registry of the losses the trainer can use.
LOSSES = {
    'soft_triplet': LossSpec(soft_triplet_loss, lambda c: {'kernel': c.kernel},
                             query_inputs=('set_negatives', 'set_negative_mask')),
    'batch_classification': LossSpec(batch_classification_loss,
                                     lambda c: {'kernel': c.kernel}),
    # m=0: every set.
    'general_k': LossSpec(general_k_loss,
                          lambda c: {'kernel': c.kernel, 'k': c.k, 'm': c.m or None},
                          takes_rng=True),
    'batch_hard_triplet': LossSpec(batch_hard_triplet_loss,
                                   lambda c: {'margin': c.margin}),
    'temperature_ce': LossSpec(temperature_cross_entropy,
                               lambda c: {'temperature': c.temperature}),
    'ssn': LossSpec(ssn_loss,
                    lambda c: {'temperature': c.temperature, 'kl_weight': c.kl_weight},
                    query_inputs=('negative_query',)),
}


def get_loss(loss_config) -> tuple[Callable[..., jax.Array], LossSpec]:
  """(loss function with `config.loss`'s options bound, its LossSpec).

  Raises:
    ValueError: unknown `loss_config.name` (the error lists the valid names).
  """
  if loss_config.name not in LOSSES:
    raise ValueError(f'unknown loss {loss_config.name!r}; valid losses: {sorted(LOSSES)}')
  spec = LOSSES[loss_config.name]
  return functools.partial(spec.fn, **spec.options(loss_config)), spec


def get_loss_fn(loss_config) -> Callable[..., jax.Array]:
  """The loss function of `config.loss` with its options bound (see `get_loss`)."""
  return get_loss(loss_config)[0]
