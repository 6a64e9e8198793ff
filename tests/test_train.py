"""The train step: sharded == single device, resume == uninterrupted, errors before compiling."""
import jax
import numpy as np
import pytest

from cir_jax import losses
from tests import fakes


def run_steps(config, split, devices, steps=3):
  """Trains `steps` steps on the first `devices` devices; returns (losses, params)."""
  run = fakes.run_steps(config, split, devices, steps)
  return run.losses, run.state.params


# The trainer's step on 1 vs 8 devices: a BatchNorm ResNet (per-device batch statistics)
# and the global all-gather loss. Every loss's global-batch form is checked against its
# NumPy reference on 8 devices in tests/test_losses.py, so one loss suffices here.
def test_sharded_step_equals_single_device():
  config = fakes.tiny_config("tirg_lastconv", **{"loss.name": "soft_triplet",
                                                 "model.conv_impl": "auto"})
  split = fakes.random_split(num_queries=40)
  losses_1, params_1 = run_steps(config, split, devices=1)
  losses_8, params_8 = run_steps(config, split, devices=8)
  np.testing.assert_allclose(losses_8, losses_1, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8)):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
  assert len(set(np.round(losses_1, 4))) == 3  # the params really moved


def test_unknown_loss_lists_valid_ones():
  config = fakes.tiny_config(**{"loss.name": "hinge"})
  with pytest.raises(ValueError, match="valid losses: \\['batch_classification', "
                     "'batch_hard_triplet', 'general_k', 'soft_triplet', 'ssn', "
                     "'temperature_ce'\\]"):
    losses.get_loss_fn(config.loss)
