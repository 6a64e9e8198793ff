"""Tests for cir_jax.losses against plain NumPy references (float64 loops).

Values are compared with independent loop implementations; gradients with
central finite differences of those references, so neither side shares code
with the library.
"""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cir_jax import losses

# ---------------------------------------------------------------------------
# NumPy references: written as loops, deliberately unvectorised.


def np_kernel(a, b, kernel):
  if kernel == 'dot':
    return float(np.dot(a, b))
  return -float(np.sum((a - b) ** 2))


def np_soft_triplet(q, c, pos, kernel='neg_sq_l2'):
  total, count = 0.0, 0
  for i in range(len(q)):
    kp = np_kernel(q[i], c[pos[i]], kernel)
    for j in range(len(c)):
      if j != pos[i]:
        total += math.log1p(math.exp(np_kernel(q[i], c[j], kernel) - kp))
        count += 1
  return total / count


def np_batch_classification(q, c, pos, kernel='dot'):
  total = 0.0
  for i in range(len(q)):
    logits = [np_kernel(q[i], c[j], kernel) for j in range(len(c))]
    total -= logits[pos[i]] - math.log(sum(math.exp(x) for x in logits))
  return total / len(q)


def np_general_k_enumerated(q, c, pos, k, kernel='dot'):
  """Eq. 4 with every (K-1)-subset of the negatives as one set."""
  total, count = 0.0, 0
  for i in range(len(q)):
    negs = [j for j in range(len(c)) if j != pos[i]]
    kp = np_kernel(q[i], c[pos[i]], kernel)
    for subset in itertools.combinations(negs, k - 1):
      denom = math.exp(kp) + sum(
          math.exp(np_kernel(q[i], c[j], kernel)) for j in subset)
      total -= kp - math.log(denom)
      count += 1
  return total / count


def np_batch_hard(q, c, pos, margin, ql=None, cl=None):
  total, count = 0.0, 0
  for i in range(len(q)):
    d_pos, d_neg = [], []
    for j in range(len(c)):
      dist = math.sqrt(np.sum((q[i] - c[j]) ** 2))
      same = j == pos[i] or (ql is not None and cl[j] == ql[i])
      (d_pos if same else d_neg).append(dist)
    if not d_neg:
      continue
    total += max(0.0, max(d_pos) - min(d_neg) + margin)
    count += 1
  return total / max(count, 1)


def np_temperature_ce(q, c, pos, temperature, bidirectional=False):
  logits = np.array([[np.dot(q[i], c[j]) / temperature for j in range(len(c))]
                     for i in range(len(q))])
  fwd = 0.0
  for i in range(len(q)):
    fwd -= logits[i, pos[i]] - math.log(sum(math.exp(x) for x in logits[i]))
  fwd /= len(q)
  if not bidirectional:
    return fwd
  bwd = 0.0
  for i in range(len(q)):
    column = logits[:, pos[i]]
    bwd -= column[i] - math.log(sum(math.exp(x) for x in column))
  bwd /= len(q)
  return 0.5 * (fwd + bwd)


def finite_diff(f, x, eps=1e-5):
  """Central differences of scalar f at float64 array x."""
  grad = np.zeros_like(x)
  for idx in np.ndindex(*x.shape):
    up, down = x.copy(), x.copy()
    up[idx] += eps
    down[idx] -= eps
    grad[idx] = (f(up) - f(down)) / (2 * eps)
  return grad


def random_problem(seed, b=4, n=6, d=3, scale=0.7):
  rs = np.random.RandomState(seed)
  q = rs.randn(b, d) * scale
  c = rs.randn(n, d) * scale
  pos = rs.permutation(n)[:b]
  return q, c, pos


def check_value_and_grads(jax_fn, np_fn, q, c, pos):
  """jax_fn(q, c, pos) vs np_fn(q, c, pos): value, d/dq and d/dc."""
  value = jax_fn(jnp.float32(q), jnp.float32(c), jnp.asarray(pos))
  np.testing.assert_allclose(value, np_fn(q, c, pos), rtol=1e-5, atol=1e-6)
  gq, gc = jax.grad(jax_fn, argnums=(0, 1))(jnp.float32(q), jnp.float32(c),
                                            jnp.asarray(pos))
  np.testing.assert_allclose(gq, finite_diff(lambda x: np_fn(x, c, pos), q),
                             rtol=1e-3, atol=2e-5)
  np.testing.assert_allclose(gc, finite_diff(lambda x: np_fn(q, x, pos), c),
                             rtol=1e-3, atol=2e-5)


# ---------------------------------------------------------------------------
# Hand-worked cases.


def test_soft_triplet_hand_worked_2x2():
  eye = jnp.eye(2)
  pos = jnp.array([0, 1])
  # dot: each anchor has logit 1 on its positive, 0 on the negative:
  # log(1 + exp(0 - 1)) = 0.3132617.
  np.testing.assert_allclose(
      losses.soft_triplet_loss(eye, eye, pos, kernel='dot'), 0.3132617,
      rtol=1e-6)
  # neg_sq_l2: k(q0, c0) = 0, k(q0, c1) = -|e0 - e1|^2 = -2:
  # log(1 + exp(-2)) = 0.1269280.
  np.testing.assert_allclose(
      losses.soft_triplet_loss(eye, eye, pos, kernel='neg_sq_l2'), 0.1269280,
      rtol=1e-6)


def test_batch_classification_hand_worked_2x3():
  q = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  c = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  # Anchor 0: logits (1, 0, -1), positive 0: log(1 + e^-1 + e^-2) = 0.4076059.
  # Anchor 1: logits (0, 1, 0), positive 1: log(1 + 2 e^-1) = 0.5514447.
  expected = (0.4076059 + 0.5514447) / 2
  np.testing.assert_allclose(
      losses.batch_classification_loss(q, c, jnp.array([0, 1])), expected,
      rtol=1e-6)


def test_batch_hard_hand_worked():
  q = jnp.array([[0.0, 0.0]])
  c = jnp.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
  # Labels: candidates 0 and 2 share the query's label. Hardest positive is
  # candidate 0 at distance 5, hardest negative candidate 1 at distance 1:
  # relu(5 - 1 + 0.5) = 4.5 (Euclidean, not squared, distances).
  loss = losses.batch_hard_triplet_loss(
      q, c, jnp.array([2]), margin=0.5, query_labels=jnp.array([7]),
      candidate_labels=jnp.array([7, 1, 7]))
  np.testing.assert_allclose(loss, 4.5, rtol=1e-6)


# ---------------------------------------------------------------------------
# Value and gradient against the references.


@pytest.mark.parametrize('kernel', ['dot', 'neg_sq_l2'])
def test_soft_triplet_matches_reference(kernel):
  q, c, pos = random_problem(0)
  check_value_and_grads(
      lambda a, b, p: losses.soft_triplet_loss(a, b, p, kernel=kernel),
      lambda a, b, p: np_soft_triplet(a, b, p, kernel), q, c, pos)


def test_soft_triplet_weights_select_anchors():
  q, c, pos = random_problem(1)
  weights = jnp.array([1.0, 0.0, 1.0, 0.0])
  got = losses.soft_triplet_loss(jnp.float32(q), jnp.float32(c),
                                 jnp.asarray(pos), weights=weights)
  keep = np.array([0, 2])
  np.testing.assert_allclose(got, np_soft_triplet(q[keep], c, pos[keep]),
                             rtol=1e-5)


@pytest.mark.parametrize('kernel', ['dot', 'neg_sq_l2'])
def test_batch_classification_matches_reference(kernel):
  q, c, pos = random_problem(2)
  check_value_and_grads(
      lambda a, b, p: losses.batch_classification_loss(a, b, p, kernel),
      lambda a, b, p: np_batch_classification(a, b, p, kernel), q, c, pos)


def test_general_k_enumerated_matches_reference():
  q, c, pos = random_problem(3)
  check_value_and_grads(
      lambda a, b, p: losses.general_k_loss(a, b, p, k=3, m=None, rng=None),
      lambda a, b, p: np_general_k_enumerated(a, b, p, 3), q, c, pos)


@pytest.mark.parametrize('kernel', ['dot', 'neg_sq_l2'])
def test_general_k_reduces_to_eq5_and_eq6(kernel):
  q, c, pos = (jnp.asarray(x) for x in random_problem(4))
  q, c = q.astype(jnp.float32), c.astype(jnp.float32)
  n = c.shape[0]
  # K=2 with all M=n-1 sets is Eq. 5.
  np.testing.assert_allclose(
      losses.general_k_loss(q, c, pos, k=2, m=None, rng=None, kernel=kernel),
      losses.soft_triplet_loss(q, c, pos, kernel=kernel), rtol=1e-6)
  # K=n with M=1 is Eq. 6, whether the single set is enumerated or sampled.
  eq6 = losses.batch_classification_loss(q, c, pos, kernel=kernel)
  np.testing.assert_allclose(
      losses.general_k_loss(q, c, pos, k=n, m=None, rng=None, kernel=kernel),
      eq6, rtol=1e-6)
  np.testing.assert_allclose(
      losses.general_k_loss(q, c, pos, k=n, m=1, rng=jax.random.key(0),
                            kernel=kernel), eq6, rtol=1e-6)


def test_negative_sets_are_distinct_uniform_and_exclude_positive():
  n, k, m = 6, 3, 6000
  pos = jnp.array([0, 3, 5])
  sets = np.asarray(losses.negative_sets(pos, n, k, m, jax.random.key(1)))
  assert sets.shape == (3, m, k - 1)
  for i, p in enumerate(np.asarray(pos)):
    assert not (sets[i] == p).any()
    assert (sets[i, :, 0] != sets[i, :, 1]).all()
    # Each of the 5 negatives is in a set with probability (K-1)/(n-1) = 0.4;
    # 6000 draws give a standard error of 0.0063, so 0.03 is ~5 sigma.
    freq = np.array([(sets[i] == j).any(axis=1).mean() for j in range(n)
                     if j != p])
    np.testing.assert_allclose(freq, 0.4, atol=0.03)


def test_general_k_sampled_converges_to_enumerated():
  q, c, pos = random_problem(5)
  sampled = losses.general_k_loss(jnp.float32(q), jnp.float32(c),
                                  jnp.asarray(pos), k=3, m=4000,
                                  rng=jax.random.key(2))
  # 16000 set losses with std ~1.0 here: standard error ~0.008, so 0.04 is
  # ~5 sigma.
  np.testing.assert_allclose(sampled, np_general_k_enumerated(q, c, pos, 3),
                             atol=0.04)


def test_general_k_rejects_bad_k():
  q, c, pos = random_problem(6)
  with pytest.raises(ValueError, match='k=7'):
    losses.general_k_loss(q, c, pos, k=7, m=1, rng=jax.random.key(0))


def test_batch_hard_matches_reference_without_labels():
  q, c, pos = random_problem(7)
  check_value_and_grads(
      lambda a, b, p: losses.batch_hard_triplet_loss(a, b, p, margin=0.3),
      lambda a, b, p: np_batch_hard(a, b, p, 0.3), q, c, pos)


def test_batch_hard_matches_reference_with_labels():
  q, c, _ = random_problem(8, b=5, n=7)
  pos = np.array([0, 1, 2, 3, 4])
  ql = np.array([0, 0, 1, 2, 3])
  # Queries 0 and 1 share label 0, so each has two positives; query 4
  # (label 3) has three (its target 4 and candidates 5, 6).
  cl = np.array([0, 0, 1, 2, 3, 3, 3])
  check_value_and_grads(
      lambda a, b, p: losses.batch_hard_triplet_loss(
          a, b, p, 0.2, jnp.asarray(ql), jnp.asarray(cl)),
      lambda a, b, p: np_batch_hard(a, b, p, 0.2, ql, cl), q, c, pos)


def test_batch_hard_drops_anchors_without_negatives():
  q, c, _ = random_problem(9, b=2, n=3)
  pos = np.array([0, 1])
  ql, cl = np.array([5, 6]), np.array([5, 6, 6])
  got = losses.batch_hard_triplet_loss(jnp.float32(q), jnp.float32(c),
                                       jnp.asarray(pos), 0.2, jnp.asarray(ql),
                                       jnp.asarray(cl))
  np.testing.assert_allclose(got, np_batch_hard(q, c, pos, 0.2, ql, cl),
                             rtol=1e-5)
  # Everyone shares one label: no triplet at all, loss 0 and finite grads.
  same = jnp.zeros(3, jnp.int32)
  fn = lambda a: losses.batch_hard_triplet_loss(
      a, jnp.float32(c), jnp.asarray(pos), 0.2, same[:2], same)
  assert float(fn(jnp.float32(q))) == 0.0
  assert np.isfinite(np.asarray(jax.grad(fn)(jnp.float32(q)))).all()


def test_batch_hard_gradient_finite_at_zero_distance():
  q = jnp.array([[1.0, 2.0]])
  c = jnp.array([[1.0, 2.0], [0.0, 0.0]])
  grad = jax.grad(lambda a: losses.batch_hard_triplet_loss(
      a, c, jnp.array([0]), 1.0))(q)
  assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize('bidirectional', [False, True])
def test_temperature_ce_matches_reference(bidirectional):
  q, c, pos = random_problem(10, b=5, n=5)
  check_value_and_grads(
      lambda a, b, p: losses.temperature_cross_entropy(a, b, p, 0.5,
                                                       bidirectional),
      lambda a, b, p: np_temperature_ce(a, b, p, 0.5, bidirectional),
      q, c, pos)


def test_unknown_kernel_lists_valid_ones():
  with pytest.raises(ValueError, match='neg_sq_l2'):
    losses.soft_triplet_loss(jnp.ones((2, 2)), jnp.ones((2, 2)),
                             jnp.array([0, 1]), kernel='cosine')


# ---------------------------------------------------------------------------
# Global batch on 8 fake devices.

GLOBAL_CASES = {
    'soft_triplet': (
        dict(loss_fn=losses.soft_triplet_loss),
        lambda q, c, p: np_soft_triplet(q, c, p)),
    'batch_classification': (
        dict(loss_fn=losses.batch_classification_loss),
        lambda q, c, p: np_batch_classification(q, c, p)),
    'temperature_ce': (
        dict(loss_fn=losses.temperature_cross_entropy,
             temperature=jnp.float32(0.5)),
        lambda q, c, p: np_temperature_ce(q, c, p, 0.5)),
    'temperature_ce_symmetric': (
        dict(loss_fn=losses.temperature_cross_entropy, temperature=0.5,
             symmetric=True),
        lambda q, c, p: np_temperature_ce(q, c, p, 0.5, bidirectional=True)),
    'batch_hard': (
        dict(loss_fn=losses.batch_hard_triplet_loss, margin=0.3),
        lambda q, c, p: np_batch_hard(q, c, p, 0.3)),
}


@pytest.fixture(scope='module')
def mesh8():
  assert jax.device_count() == 8, 'conftest must force 8 CPU devices'
  return Mesh(np.array(jax.devices()), ('data',))


def sharded_pair(mesh, q, t):
  sharding = NamedSharding(mesh, P('data'))
  return (jax.device_put(jnp.float32(q), sharding),
          jax.device_put(jnp.float32(t), sharding))


@pytest.mark.parametrize('case', sorted(GLOBAL_CASES))
def test_global_batch_loss_equals_concatenated_reference(mesh8, case):
  kw, np_fn = GLOBAL_CASES[case]
  rs = np.random.RandomState(11)
  q, t = rs.randn(16, 3) * 0.6, rs.randn(16, 3) * 0.6
  pos = np.arange(16)

  @jax.jit
  def loss(a, b):
    return losses.global_batch_loss(query=a, target=b, mesh=mesh8, **kw)

  qs, ts = sharded_pair(mesh8, q, t)
  np.testing.assert_allclose(loss(qs, ts), np_fn(q, t, pos), rtol=1e-5)
  gq, gt = jax.jit(jax.grad(loss, argnums=(0, 1)))(qs, ts)
  # The target gradient crosses the all-gather (reduce-scatter transpose).
  np.testing.assert_allclose(gq, finite_diff(lambda x: np_fn(x, t, pos), q),
                             rtol=1e-3, atol=2e-5)
  np.testing.assert_allclose(gt, finite_diff(lambda x: np_fn(q, x, pos), t),
                             rtol=1e-3, atol=2e-5)


def test_global_batch_loss_local_negatives_is_per_shard_average(mesh8):
  rs = np.random.RandomState(12)
  q, t = rs.randn(16, 3), rs.randn(16, 3)
  local = np.arange(2)

  def np_local(qq, tt):
    return np.mean([np_batch_classification(qq[s:s + 2], tt[s:s + 2], local)
                    for s in range(0, 16, 2)])

  @jax.jit
  def loss(a, b):
    return losses.global_batch_loss(losses.batch_classification_loss, a, b,
                                    mesh8, negatives='local')

  qs, ts = sharded_pair(mesh8, q, t)
  np.testing.assert_allclose(loss(qs, ts), np_local(q, t), rtol=1e-5)
  gq, gt = jax.grad(loss, argnums=(0, 1))(qs, ts)
  np.testing.assert_allclose(gq, finite_diff(lambda x: np_local(x, t), q),
                             rtol=1e-3, atol=2e-5)
  np.testing.assert_allclose(gt, finite_diff(lambda x: np_local(q, x), t),
                             rtol=1e-3, atol=2e-5)


def test_global_batch_general_k_enumerated(mesh8):
  rs = np.random.RandomState(13)
  q, t = rs.randn(8, 3), rs.randn(8, 3)
  got = losses.global_batch_loss(losses.general_k_loss, jnp.float32(q),
                                 jnp.float32(t), mesh8, k=3, m=None, rng=None)
  np.testing.assert_allclose(got, np_general_k_enumerated(q, t, np.arange(8),
                                                          3), rtol=1e-5)
  # Sampled sets: finite, and another key draws other sets.
  sampled = [float(losses.global_batch_loss(losses.general_k_loss, jnp.float32(q),
                                            jnp.float32(t), mesh8, k=3, m=2,
                                            rng=jax.random.key(seed)))
             for seed in (0, 1)]
  assert np.all(np.isfinite(sampled)) and sampled[0] != sampled[1]


def test_global_batch_loss_draws_independently_on_each_device(mesh8):
  # A "loss" that returns its own random draw: the pmean over the 8 devices must be
  # the mean of 8 different draws (rng folded with the device index), not one draw.
  def draw(query, candidates, positive_index, rng):
    del query, candidates, positive_index
    return jax.random.uniform(rng)

  key = jax.random.key(0)
  got = float(losses.global_batch_loss(draw, jnp.ones((8, 2)), jnp.ones((8, 2)), mesh8,
                                       rng=key))
  per_device = [float(jax.random.uniform(jax.random.fold_in(key, d))) for d in range(8)]
  assert len(set(per_device)) == 8
  np.testing.assert_allclose(got, np.mean(per_device), rtol=1e-6)
  assert abs(got - float(jax.random.uniform(key))) > 1e-3


def test_global_batch_loss_rejects_indivisible_batch(mesh8):
  with pytest.raises(ValueError, match=r'13.*8 devices'):
    losses.global_batch_loss(losses.soft_triplet_loss, jnp.ones((13, 3)),
                             jnp.ones((13, 3)), mesh8)


def test_global_batch_loss_rejects_local_bidirectional(mesh8):
  with pytest.raises(ValueError, match='symmetric=True'):
    losses.global_batch_loss(losses.temperature_cross_entropy,
                             jnp.ones((8, 3)), jnp.ones((8, 3)), mesh8,
                             temperature=0.1, bidirectional=True)
