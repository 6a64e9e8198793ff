"""The train step: sharded == single device, resume == uninterrupted, errors before compiling."""
import json

import jax
import numpy as np
import pytest

from cir_jax import optim
from cir_jax import sharding
from cir_jax import train
from cir_jax import train_state
from cir_jax.data import pipeline
from cir_jax.data.vocab import Vocabulary
from cir_jax.models import build
from tests import fakes


def run_steps(config, split, devices, steps=3):
  """Trains `steps` steps on the first `devices` devices; returns (losses, params)."""
  mesh = sharding.make_mesh(jax.devices()[:devices])
  vocab = Vocabulary.build(split.texts)
  data = pipeline.TrainPipeline(split, vocab, 8, config.batch_size, mesh, config.seed,
                                config.data.image_size,
                                set_negatives=config.loss.get("set_negatives", 0))
  model = build.build_model(config.model, len(vocab))
  tx = optim.make_optimizer(config.optimizer)
  example = {k: jax.ShapeDtypeStruct((config.batch_size,) + v.shape[1:], v.dtype)
             for k, v in next(data.dataset(0).as_numpy_iterator()).items()}
  state = train_state.create_train_state(model, tx, example, config.seed, mesh)
  step_fn = train.make_train_step(model, tx, config.loss, mesh)
  batches, losses = data.batches(0), []
  for _ in range(steps):
    state, metrics = step_fn(state, next(batches))
    losses.append(float(metrics["loss"]))
  return np.array(losses), jax.device_get(state.params)


@pytest.mark.parametrize("composer,loss", [("tirg_lastconv", "soft_triplet"),
                                           ("concat", "batch_classification")])
def test_sharded_step_equals_single_device(composer, loss):
  config = fakes.tiny_config(composer, **{"loss.name": loss, "model.conv_impl": "auto"})
  if loss == "batch_classification":
    config.loss.kernel = "dot"
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
    train.get_loss_fn(config.loss)
