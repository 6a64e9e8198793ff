"""The trainer's logged in-batch Recall@K equals the evaluation path's recall.

tests/test_retrieval.py checks `retrieval.in_batch_recall` against
`evaluate_retrieval` on given embeddings; this checks the numbers the train step
actually reports (`batch_R@K`, from inside the jitted, sharded step) against
`evaluate_retrieval` run on the embeddings of the same batch, recomputed
outside the step with the same parameters, BatchNorm mode and dropout key.
"""
import jax
import numpy as np
import pytest

from cir_jax import experiment
from cir_jax import retrieval
from cir_jax import train
from cir_jax.data import pipeline
from cir_jax.data.vocab import Vocabulary
from tests import fakes


@pytest.mark.slow  # compiles a whole train step, an embedding step and the evaluation
def test_logged_batch_recall_equals_eval_recall_of_the_same_embeddings():
  config = fakes.tiny_config("concat", batch_size=16)
  split = fakes.random_split(num_queries=40)
  mesh = experiment.make_mesh(config)  # 8 fake devices: 2 queries each, targets all-gathered
  vocab = Vocabulary.build(split.texts)
  data = pipeline.TrainPipeline(split, vocab, config.data.max_text_len, config.batch_size, mesh,
                                config.seed, config.data.image_size)
  exp = experiment.build(config, mesh, vocab)
  model, tx, state = exp.model, exp.tx, exp.state
  batch = next(data.batches(0))

  @jax.jit
  def embed(state, batch):  # what the step computes before its update
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (query, target, _), _ = model.apply(
        {"params": state.params, "batch_stats": state.batch_stats}, batch, train=True,
        rngs={"dropout": rng}, mutable=["batch_stats"])
    return query, target

  query, target = embed(state, batch)  # before the step donates `state`
  _, metrics = train.make_train_step(model, tx, config.loss, mesh)(state, batch)
  logged = {k: float(v) for k, v in jax.device_get(metrics).items() if k.startswith("batch_")}

  ids = np.arange(config.batch_size)  # query i's target is target i of the batch
  evaluated = retrieval.evaluate_retrieval(query, target, ids, ids, ks=train.IN_BATCH_KS,
                                           mesh=mesh)
  assert logged == {f"batch_{k}": v for k, v in evaluated.items()}
  # Not degenerate: recall grows with K, so the ranking (not only all-or-nothing) is compared.
  assert len(set(evaluated.values())) > 1, evaluated
