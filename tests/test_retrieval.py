"""Tests for cir_jax.retrieval: hand-worked cases and NumPy brute force.

The NumPy references rank with a stable argsort of the full score matrix,
the rank definition documented in cir_jax/retrieval.py (score descending,
equal scores by lower gallery index).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cir_jax import retrieval
from cir_jax import sharding


@pytest.fixture(scope='module')
def mesh8():
  assert jax.device_count() == 8, 'conftest must force 8 CPU devices'
  return Mesh(np.array(jax.devices()), ('data',))


@pytest.fixture(scope='module')
def mesh1():
  return sharding.single_device_mesh()


# ---------------------------------------------------------------------------
# Hand-worked 4 x 8 similarity matrix. With gallery = identity, the scores
# are exactly the rows of S.

S = np.array([
    [0.9, 0.1, 0.3, 0.2, 0.0, 0.5, 0.4, 0.6],
    [0.2, 0.8, 0.9, 0.1, 0.0, 0.3, 0.7, 0.4],
    [0.5, 0.5, 0.5, 0.5, 0.1, 0.0, 0.2, 0.3],
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
], np.float32)
EXCLUDE = np.array([-1, -1, -1, 7])


@pytest.mark.parametrize('mesh_name', ['mesh1', 'mesh8'])
def test_hand_worked_single_targets(mesh_name, request):
  mesh = request.getfixturevalue(mesh_name)
  # q0 -> target 0: top score, rank 0.
  # q1 -> target 1: only item 2 (0.9) is higher, rank 1.
  # q2 -> target 3: ties with items 0, 1, 2 which have lower ids, rank 3.
  # q3 -> target 2: item 7 is excluded; 6, 5, 4, 3 are higher, rank 4.
  metrics = retrieval.evaluate_retrieval(
      jnp.asarray(S), jnp.eye(8), jnp.arange(8), jnp.array([0, 1, 3, 2]),
      jnp.asarray(EXCLUDE), ks=(1, 2, 4, 5), mesh=mesh)
  assert metrics == {'R@1': 25.0, 'R@2': 50.0, 'R@4': 75.0, 'R@5': 100.0}
  # Without the exclusion q3's target drops to rank 5.
  metrics = retrieval.evaluate_retrieval(
      jnp.asarray(S), jnp.eye(8), jnp.arange(8), jnp.array([0, 1, 3, 2]),
      ks=(5,), mesh=mesh)
  assert metrics == {'R@5': 75.0}


@pytest.mark.parametrize('mesh_name', ['mesh1', 'mesh8'])
def test_hand_worked_target_sets(mesh_name, request):
  mesh = request.getfixturevalue(mesh_name)
  labels = jnp.array([0, 0, 1, 1, 2, 2, 3, 3])
  # q0 label 0 {0, 1}: item 0 is first -> hit@1.
  # q1 label 1 {2, 3}: item 2 is first -> hit@1.
  # q2 label 3 {6, 7}: order 0, 1, 2, 3 (tied 0.5), then 7 -> rank 4.
  # q3 label 1 {2, 3}, 7 excluded: order 6, 5, 4, 3 -> rank 3.
  metrics = retrieval.evaluate_retrieval(
      jnp.asarray(S), jnp.eye(8), labels, jnp.array([0, 1, 3, 1]),
      jnp.asarray(EXCLUDE), ks=(1, 3, 4, 5), mesh=mesh)
  assert metrics == {'R@1': 50.0, 'R@3': 50.0, 'R@4': 75.0, 'R@5': 100.0}


def test_hand_worked_topk_ids_and_padding_slots(mesh8):
  # Only items 0..4 are valid and q3 excludes 4: its 5th slot is empty.
  scores, ids = retrieval.gallery_topk(
      jnp.asarray(S), jnp.eye(8), 5, mesh8,
      exclude_index=jnp.array([-1, -1, -1, 4]),
      gallery_valid=jnp.arange(8) < 5)
  np.testing.assert_array_equal(ids, [[0, 2, 3, 1, 4],
                                      [2, 1, 0, 3, 4],
                                      [0, 1, 2, 3, 4],
                                      [3, 2, 1, 0, -1]])
  assert scores[3, 4] == -np.inf


def test_hand_worked_subset_recall(mesh8):
  # Candidates (image set minus reference), -1 padded; ties by lower id.
  cand = np.array([[1, 2, 3, -1],    # target 2: scores .1 .3 .2 -> rank 0
                   [0, 1, 5, 6],     # target 1: .2 .8 .3 .7 -> rank 0
                   [3, 1, 2, 7],     # target 3: .5 .5 .5 .3 -> ties, rank 2
                   [0, 1, 2, 3]])    # target 0: .1 .2 .3 .4 -> rank 3
  target = np.array([2, 1, 3, 0])
  for mesh in (None, mesh8):
    metrics = retrieval.subset_recall(
        jnp.asarray(S), jnp.eye(8), jnp.asarray(cand), jnp.asarray(target),
        ks=(1, 2, 3, 4), mesh=mesh)
    assert {k: float(v) for k, v in metrics.items()} == {
        'R_subset@1': 50.0, 'R_subset@2': 50.0, 'R_subset@3': 75.0,
        'R_subset@4': 100.0}


def test_subset_recall_rejects_missing_target():
  with pytest.raises(ValueError, match='target 5 of query 1'):
    retrieval.subset_recall(jnp.asarray(S), jnp.eye(8),
                            jnp.array([[0, 1], [2, 3], [4, 5], [6, 7]]),
                            jnp.array([0, 5, 4, 6]))


# ---------------------------------------------------------------------------
# Brute force on random data with ties, G not divisible by 8.


def np_topk(q, g, k, exclude=None, valid=None):
  scores = q.astype(np.float64) @ g.T.astype(np.float64)
  for i in range(len(q)):
    if exclude is not None and exclude[i] >= 0:
      scores[i, exclude[i]] = -np.inf
    if valid is not None:
      scores[i, ~valid] = -np.inf
  order = np.argsort(-scores, axis=1, kind='stable')[:, :k]
  return np.take_along_axis(scores, order, axis=1), order


def np_recall(order, gallery_labels, target_labels, ks, query_valid=None):
  out = {}
  for k in ks:
    hits, count = 0, 0
    for i in range(len(order)):
      if query_valid is not None and not query_valid[i]:
        continue
      count += 1
      hits += any(gallery_labels[j] == target_labels[i] for j in order[i, :k])
    out[f'R@{k}'] = 100.0 * hits / count
  return out


def np_subset_recall(q, g, cand, target, ks):
  out = {k: 0 for k in ks}
  for i in range(len(q)):
    members = [c for c in cand[i] if c >= 0]
    # Sort by (-score, gallery id): the documented tie-break.
    ranked = sorted(members, key=lambda c: (-float(q[i] @ g[c]), c))
    for k in ks:
      out[k] += target[i] in ranked[:k]
  return {f'R_subset@{k}': 100.0 * v / len(q) for k, v in out.items()}


@pytest.fixture(scope='module')
def random_gallery():
  rs = np.random.RandomState(0)
  num_gallery, num_query, d = 1003, 37, 6
  # Small integers: dot products are exact in float32 and tie often.
  g = rs.randint(-2, 3, (num_gallery, d)).astype(np.float32)
  q = rs.randint(-2, 3, (num_query, d)).astype(np.float32)
  labels = rs.randint(0, 60, num_gallery)  # target sets of ~17 images
  exclude = rs.randint(-1, num_gallery, num_query)
  target = labels[rs.randint(0, num_gallery, num_query)]
  cand = np.full((num_query, 6), -1)
  subset_target = np.zeros(num_query, int)
  for i in range(num_query):
    members = rs.choice(num_gallery, rs.randint(2, 7), replace=False)
    cand[i, :len(members)] = members
    subset_target[i] = rs.choice(members)
  return dict(q=q, g=g, labels=labels, exclude=exclude, target=target,
              cand=cand, subset_target=subset_target)


def test_random_data_has_ties(random_gallery):
  scores = random_gallery['q'] @ random_gallery['g'].T
  top = np.sort(scores, axis=1)[:, ::-1][:, :50]
  assert (np.diff(top, axis=1) == 0).mean() > 0.5


@pytest.mark.parametrize('mesh_name', ['mesh1', 'mesh8'])
def test_gallery_topk_equals_brute_force(random_gallery, mesh_name, request):
  mesh = request.getfixturevalue(mesh_name)
  r = random_gallery
  gallery, valid = retrieval.shard_gallery(jnp.asarray(r['g']), mesh)
  scores, ids = retrieval.gallery_topk(
      jnp.asarray(r['q']), gallery, 50, mesh,
      exclude_index=jnp.asarray(r['exclude']), block_size=16,
      gallery_valid=valid)
  ref_scores, ref_ids = np_topk(r['q'], r['g'], 50, r['exclude'])
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(scores, ref_scores)


@pytest.mark.parametrize('chunk,k', [(4, 1), (4, 7), (8, 12), (3, 5), (5, 7)])  # 96 % 5: padded
def test_block_topk_chunk_pruning_is_exact_with_ties(chunk, k):
  rs = np.random.RandomState(chunk * 100 + k)
  s = rs.randint(-3, 4, (9, 96)).astype(np.float32)   # many exact ties
  s[0, :] = 1.0                                         # a row of one value
  s[1, rs.rand(96) < 0.5] = -np.inf                     # masked entries
  vals, pos = retrieval._block_topk(jnp.asarray(s), k, chunk=chunk)
  order = np.argsort(-s, axis=1, kind='stable')[:, :k]
  np.testing.assert_array_equal(pos, order)
  np.testing.assert_array_equal(vals, np.take_along_axis(s, order, axis=1))


@pytest.mark.parametrize('mesh_name', ['mesh1', 'mesh8'])
@pytest.mark.parametrize('gallery_block,k', [(192, 5), (64, 20), (40, 50)])
def test_gallery_topk_blocked_over_gallery(random_gallery, mesh_name, request,
                                           gallery_block, k):
  """Gallery blocks of a running top-k merge (chunk-pruned when blocks allow)
  give the brute-force ids, ties by lower id, with exclusions and invalid rows."""
  mesh = request.getfixturevalue(mesh_name)
  r = random_gallery
  valid = np.random.RandomState(2).rand(len(r['g'])) < 0.8
  scores, ids = retrieval.gallery_topk(
      jnp.asarray(r['q']), jnp.asarray(r['g']), k, mesh,
      exclude_index=jnp.asarray(r['exclude']), block_size=16,
      gallery_valid=jnp.asarray(valid), gallery_block_size=gallery_block)
  ref_scores, ref_ids = np_topk(r['q'], r['g'], k, r['exclude'], valid)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(scores, ref_scores)


def test_gallery_topk_unpadded_gallery_and_invalid_rows(random_gallery, mesh8):
  r = random_gallery
  valid = np.random.RandomState(1).rand(len(r['g'])) < 0.5
  _, ids = retrieval.gallery_topk(jnp.asarray(r['q']), jnp.asarray(r['g']),
                                  20, mesh8, block_size=8,
                                  gallery_valid=jnp.asarray(valid))
  np.testing.assert_array_equal(ids, np_topk(r['q'], r['g'], 20,
                                             valid=valid)[1])


@pytest.mark.parametrize('mesh_name', ['mesh1', 'mesh8'])
def test_evaluate_retrieval_equals_brute_force(random_gallery, mesh_name,
                                               request):
  mesh = request.getfixturevalue(mesh_name)
  r = random_gallery
  gallery, valid = retrieval.shard_gallery(jnp.asarray(r['g']), mesh)
  metrics, ids = retrieval.evaluate_retrieval(
      jnp.asarray(r['q']), gallery, jnp.asarray(r['labels']),
      jnp.asarray(r['target']), jnp.asarray(r['exclude']),
      ks=(1, 5, 10, 50), mesh=mesh, return_topk=7, gallery_valid=valid,
      subset_candidates=jnp.asarray(r['cand']),
      subset_target=jnp.asarray(r['subset_target']), block_size=16)
  _, order = np_topk(r['q'], r['g'], 50, r['exclude'])
  expected = np_recall(order, r['labels'], r['target'], (1, 5, 10, 50))
  expected.update(np_subset_recall(r['q'], r['g'], r['cand'],
                                   r['subset_target'], (1, 2, 3)))
  assert metrics.keys() == expected.keys()
  for key in expected:
    np.testing.assert_allclose(metrics[key], expected[key], rtol=1e-6,
                               err_msg=key)
  np.testing.assert_array_equal(ids, order[:, :7])
  # Not a degenerate test: some but not all queries hit.
  assert 0 < expected['R@10'] < 100
  assert 0 < expected['R_subset@1'] < 100


def test_sharded_equals_single_device(random_gallery, mesh1, mesh8):
  r = random_gallery
  results = []
  for mesh in (mesh1, mesh8):
    gallery, valid = retrieval.shard_gallery(jnp.asarray(r['g']), mesh)
    results.append(retrieval.evaluate_retrieval(
        jnp.asarray(r['q']), gallery, jnp.asarray(r['labels']),
        jnp.asarray(r['target']), jnp.asarray(r['exclude']), mesh=mesh,
        return_topk=50, gallery_valid=valid,
        subset_candidates=jnp.asarray(r['cand']),
        subset_target=jnp.asarray(r['subset_target']), block_size=16))
  assert results[0][0] == results[1][0]
  np.testing.assert_array_equal(results[0][1], results[1][1])


def test_padded_queries_never_count(random_gallery, mesh8):
  r = random_gallery
  q, q_valid = retrieval.pad_to_multiple(jnp.asarray(r['q']), 16)
  target, _ = retrieval.pad_to_multiple(jnp.asarray(r['target']), 16)
  exclude, _ = retrieval.pad_to_multiple(jnp.asarray(r['exclude']), 16, -1)
  assert q.shape[0] == 48 and int(q_valid.sum()) == 37
  padded = retrieval.evaluate_retrieval(
      q, jnp.asarray(r['g']), jnp.asarray(r['labels']), target, exclude,
      mesh=mesh8, query_valid=q_valid)
  plain = retrieval.evaluate_retrieval(
      jnp.asarray(r['q']), jnp.asarray(r['g']), jnp.asarray(r['labels']),
      jnp.asarray(r['target']), jnp.asarray(r['exclude']), mesh=mesh8)
  assert padded == plain


# ---------------------------------------------------------------------------
# Perfect model, in-batch recall, host transfers.


def test_perfect_model_gets_full_recall_with_exclusion(mesh8):
  rs = np.random.RandomState(2)
  gallery = rs.randn(203, 16).astype(np.float32)
  gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
  target = rs.randint(0, 203, 50)
  reference = (target + 1 + rs.randint(0, 202, 50)) % 203  # never the target
  query = gallery[target]  # the composer lands exactly on the target
  args = (jnp.asarray(query), jnp.asarray(gallery), jnp.arange(203),
          jnp.asarray(target))
  metrics = retrieval.evaluate_retrieval(*args, jnp.asarray(reference),
                                         ks=(1,), mesh=mesh8)
  assert metrics == {'R@1': 100.0}
  # Excluding the target itself instead must make every query miss at 1.
  metrics = retrieval.evaluate_retrieval(*args, jnp.asarray(target), ks=(1,),
                                         mesh=mesh8)
  assert metrics == {'R@1': 0.0}


def np_in_batch_recall(q, t, ks):
  scores = q @ t.T
  out = {}
  for k in ks:
    hits = 0
    for i in range(len(q)):
      # Stable rank: strictly higher scores, plus ties at lower index.
      rank = sum(1 for j in range(len(t))
                 if scores[i, j] > scores[i, i]
                 or (scores[i, j] == scores[i, i] and j < i))
      hits += rank < k
    out[f'R@{k}'] = 100.0 * hits / len(q)
  return out


def test_in_batch_recall_equals_eval_path_and_reference(mesh8):
  rs = np.random.RandomState(3)
  # Quantised embeddings so that ties occur and the tie rule matters.
  q = rs.randint(-1, 2, (32, 4)).astype(np.float32)
  t = rs.randint(-1, 2, (32, 4)).astype(np.float32)
  ks = (1, 5, 10)
  sharding = NamedSharding(mesh8, P('data'))
  qs, ts = jax.device_put(q, sharding), jax.device_put(t, sharding)
  in_step = jax.jit(lambda a, b: retrieval.in_batch_recall(a, b, ks, mesh8))(
      qs, ts)
  in_step = {k: float(v) for k, v in in_step.items()}
  unsharded = {k: float(v) for k, v in
               retrieval.in_batch_recall(jnp.asarray(q), jnp.asarray(t),
                                         ks).items()}
  eval_path = retrieval.evaluate_retrieval(qs, ts, jnp.arange(32),
                                           jnp.arange(32), ks=ks, mesh=mesh8)
  expected = np_in_batch_recall(q, t, ks)
  assert in_step == unsharded == eval_path == pytest.approx(expected)
  assert 0 < expected['R@1'] < expected['R@10'] < 100


def test_collapsed_embeddings_do_not_score_full_recall():
  # All scores tie: a rank that ignored ties would report 100.
  ones = jnp.ones((16, 4))
  metrics = retrieval.in_batch_recall(ones, ones, ks=(1, 5))
  assert float(metrics['R@1']) == pytest.approx(100 / 16)
  assert float(metrics['R@5']) == pytest.approx(100 * 5 / 16)


def test_evaluate_retrieval_makes_no_implicit_transfers(random_gallery, mesh8):
  r = random_gallery
  gallery, valid = retrieval.shard_gallery(jnp.asarray(r['g']), mesh8)
  # Place the inputs as the jitted computation wants them (replicated), as
  # an embedding step's outputs would be, so only the result moves.
  inputs = jax.device_put((r['q'], r['labels'], r['target'], r['exclude']),
                          NamedSharding(mesh8, P()))
  with jax.transfer_guard('disallow'):
    metrics = retrieval.evaluate_retrieval(
        inputs[0], gallery, inputs[1], inputs[2], inputs[3], mesh=mesh8,
        gallery_valid=valid)
  assert set(metrics) == {'R@1', 'R@5', 'R@10', 'R@50'}


def test_errors_name_the_sizes(mesh8):
  with pytest.raises(ValueError, match='k=9'):
    retrieval.gallery_topk(jnp.ones((2, 3)), jnp.ones((8, 3)), 9, mesh8)
  with pytest.raises(ValueError, match=r'12.*8 devices'):
    retrieval.in_batch_recall(jnp.ones((12, 3)), jnp.ones((12, 3)),
                              mesh=mesh8)
  with pytest.raises(ValueError, match='K=10'):
    retrieval.recall_at_k(jnp.zeros((2, 5), jnp.int32), jnp.zeros(8),
                          jnp.zeros(2), ks=(1, 10))
