"""Image-set members as extra negatives (CIRPLANT on CIRR): loss, pipeline, sharded step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cir_jax import losses
from cir_jax import sharding
from cir_jax.data import pipeline
from cir_jax.data.vocab import Vocabulary
from tests import fakes
from tests import test_train


def _softplus(x):
  return np.logaddexp(0.0, x)


def _reference_loss(query, candidates, positive, extras, mask):
  """TIRG Eq. 5 with each anchor's valid set members appended to its negatives (NumPy)."""
  kernel = lambda q, c: -np.sum((q - c) ** 2, axis=-1)
  per_anchor = []
  for i, q in enumerate(query):
    pos = kernel(q, candidates[positive[i]])
    negatives = [c for j, c in enumerate(candidates) if j != positive[i]]
    negatives += [e for e, ok in zip(extras[i], mask[i]) if ok]
    per_anchor.append(np.mean([_softplus(kernel(q, n) - pos) for n in negatives]))
  return np.mean(per_anchor)


def test_loss_with_set_negatives_matches_numpy_and_ignores_masked_members():
  rng = np.random.default_rng(0)
  query, candidates = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
  positive = np.array([0, 2, 4])
  extras = rng.normal(size=(3, 2, 4))
  mask = np.array([[True, True], [True, False], [False, False]])
  got = losses.soft_triplet_loss(jnp.asarray(query), jnp.asarray(candidates),
                                 jnp.asarray(positive), set_negatives=jnp.asarray(extras),
                                 set_negative_mask=jnp.asarray(mask))
  np.testing.assert_allclose(got, _reference_loss(query, candidates, positive, extras, mask),
                             rtol=1e-5)
  # A masked member contributes nothing, however close it is to the query.
  moved = extras.copy()
  moved[1, 1] = moved[2, 0] = query[1]
  again = losses.soft_triplet_loss(jnp.asarray(query), jnp.asarray(candidates),
                                   jnp.asarray(positive), set_negatives=jnp.asarray(moved),
                                   set_negative_mask=jnp.asarray(mask))
  np.testing.assert_allclose(again, got, rtol=1e-6)
  # No valid member at all == the plain loss.
  plain = losses.soft_triplet_loss(jnp.asarray(query), jnp.asarray(candidates),
                                   jnp.asarray(positive))
  none = losses.soft_triplet_loss(jnp.asarray(query), jnp.asarray(candidates),
                                  jnp.asarray(positive), set_negatives=jnp.asarray(extras),
                                  set_negative_mask=jnp.zeros((3, 2), bool))
  np.testing.assert_allclose(none, plain, rtol=1e-6)


def test_hand_worked_single_anchor():
  # d = 1: query 0, positive 0 (distance 0), one in-batch negative at 1, members at 2 and 0.
  # Scores are -distance^2: 0, -1, -4, 0 -> mean(softplus(-1), softplus(-4), softplus(0)).
  got = losses.soft_triplet_loss(jnp.zeros((1, 1)), jnp.array([[0.0], [1.0]]),
                                 jnp.array([0]), set_negatives=jnp.array([[[2.0], [0.0]]]),
                                 set_negative_mask=jnp.array([[True, True]]))
  np.testing.assert_allclose(got, np.mean(_softplus(np.array([-1.0, -4.0, 0.0]))), rtol=1e-6)


def _split_with_sets(num_queries=40, num_images=24, size=5, seed=0):
  """A random split whose queries have image sets containing their target (as CIRR)."""
  split = fakes.random_split(num_images=num_images, num_queries=num_queries, seed=seed)
  rng = np.random.default_rng(seed)
  candidates = np.full((num_queries, size), -1, np.int64)
  for i in range(num_queries):
    others = [j for j in range(num_images) if j not in (split.ref_index[i], split.target_index[i])]
    members = [split.target_index[i]] + list(rng.choice(others, rng.integers(0, size), False))
    candidates[i, :len(members)] = sorted(members)
  return dataclasses.replace(split, candidates=candidates).validate()


def test_set_negative_rows_exclude_reference_and_target_and_pad():
  split = _split_with_sets()
  rows = pipeline.set_negative_rows(split, 4)
  assert rows.shape == (40, 4)
  for i, row in enumerate(rows):
    members = [c for c in split.candidates[i] if c >= 0 and c != split.target_index[i]]
    assert list(row[row >= 0]) == members[:4]
    assert split.ref_index[i] not in row and split.target_index[i] not in row
    assert (row[len(members[:4]):] == -1).all()
  no_sets = fakes.random_split()
  with pytest.raises(ValueError, match="random/train has no image sets .* set it to 0"):
    pipeline.set_negative_rows(no_sets, 4)


def test_pipeline_batches_carry_the_member_images():
  split = _split_with_sets()
  mesh = sharding.make_mesh(jax.devices()[:1])
  data = pipeline.TrainPipeline(split, Vocabulary.build(split.texts), 8, 8, mesh, 0, 32,
                                set_negatives=4)
  batch = next(data.dataset(0).as_numpy_iterator())
  q = data.step_indices(0).numpy()
  rows = pipeline.set_negative_rows(split, 4)[q]
  assert batch["set_negative_images"].shape == (8, 4, 32, 32, 3)
  np.testing.assert_array_equal(batch["set_negative_mask"], rows >= 0)
  for b, s in zip(*np.nonzero(rows >= 0)):
    np.testing.assert_array_equal(batch["set_negative_images"][b, s], split.images[rows[b, s]])


def test_sharded_step_with_set_negatives_equals_single_device():
  config = fakes.tiny_config("concat", **{"loss.set_negatives": 3})
  split = _split_with_sets()
  losses_1, params_1 = test_train.run_steps(config, split, devices=1)
  losses_8, params_8 = test_train.run_steps(config, split, devices=8)
  np.testing.assert_allclose(losses_8, losses_1, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8)):
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=2e-5)
  plain, _ = test_train.run_steps(fakes.tiny_config("concat"), split, devices=1, steps=1)
  assert abs(losses_1[0] - plain[0]) > 1e-4  # the members really entered the loss


def test_cirr_soft_positives_from_the_real_val_annotations_are_never_set_negatives(shared_data):
  """Set members with target_soft > 0 (the target and the partial matches) never become
  negatives (the authors, too, read target_soft only within the set, minus the reference)."""
  import json  # pylint: disable=g-import-not-at-top
  from cir_jax.data import cirr  # pylint: disable=g-import-not-at-top
  parsed = cirr.parse_split(shared_data / "CIRR", "val")
  split = parsed.to_split(shared_data / "CIRR", skip_missing=False, check=False)
  records = json.loads((shared_data / "CIRR" / "captions" / "cap.rc2.val.json").read_text())
  row = {name: i for i, name in enumerate(split.image_ids)}
  rows = pipeline.set_negative_rows(split, 4)
  extra = 0
  for i, r in enumerate(records):
    soft = {row[m] for m, v in r["target_soft"].items()
            if v > 0 and m != r["reference"] and m in r["img_set"]["members"]}
    assert set(split.soft_positives[i][split.soft_positives[i] >= 0].tolist()) == soft
    assert not soft & set(rows[i].tolist())
    extra += bool(soft - {split.target_index[i]})
  assert extra == 63  # val queries with a partial match besides the target
