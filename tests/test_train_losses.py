"""The trainer with the general-K loss (Eq. 4) and the batch-hard triplet loss."""
import numpy as np
import pytest

from tests import fakes
from tests import test_train


def _run(devices=1, steps=3, **loss_fields):
  config = fakes.tiny_config("concat", **{f"loss.{k}": v for k, v in loss_fields.items()})
  return test_train.run_steps(config, fakes.random_split(num_queries=40), devices, steps)


def test_general_k_with_k2_and_every_set_is_the_soft_triplet_loss():
  # Eq. 4 with K=2 over all C(n-1, 1) sets is Eq. 5 exactly, step after step.
  soft, _ = _run(name="soft_triplet", kernel="neg_sq_l2")
  general, _ = _run(name="general_k", kernel="neg_sq_l2", k=2, m=0)
  np.testing.assert_allclose(general, soft, rtol=1e-5, atol=1e-6)


def test_general_k_samples_sets_on_every_device():
  # K=4 with 3 sampled sets per query: the step derives the sampling rng from its own.
  losses, _ = _run(devices=8, name="general_k", kernel="dot", k=4, m=3)
  assert np.isfinite(losses).all() and len(set(np.round(losses, 5))) == 3


def test_general_k_too_large_for_the_batch_is_a_clear_error():
  with pytest.raises(ValueError, match="needs 2 <= k <= n=8"):
    _run(name="general_k", k=9, m=2)


def test_batch_hard_triplet_trains_and_reads_the_margin():
  # Scaled embeddings have norm 4, so distances are <= 8: with margins >= 20 every
  # anchor's hinge is active and the loss moves with the margin one for one.
  m20, _ = _run(steps=2, name="batch_hard_triplet", margin=20.0)
  m30, _ = _run(steps=1, name="batch_hard_triplet", margin=30.0)
  np.testing.assert_allclose(m30[0] - m20[0], 10.0, atol=1e-4)
  assert np.isfinite(m20).all() and m20[1] != m20[0]  # it trains
