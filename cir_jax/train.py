"""Trainer: `train_and_evaluate(config, workdir)` and a thin command line.

  python -m cir_jax.train --config configs/tirg_css.py --workdir runs/css [--config.batch_size=64]

One jitted step over a data-parallel mesh (works unchanged on 1 device, many
devices and many processes), the state donated, the loss over the global batch
through an explicit all-gather, in-batch Recall@K on device, host syncs only on
logging steps, Orbax checkpoints with automatic resume, TensorBoard summaries,
periodic gallery evaluation and a results JSON in the workdir.
"""
import functools
import json
import pathlib
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cir_jax import checkpoint
from cir_jax import evaluate as evaluate_lib
from cir_jax import losses
from cir_jax import optim
from cir_jax import retrieval
from cir_jax import sharding
from cir_jax import train_state as train_state_lib
from cir_jax.data import pipeline
from cir_jax.data import registry
from cir_jax.data.vocab import Vocabulary
from cir_jax.models import build as build_lib
from cir_jax.utils import logging as log_lib

LOSSES = {
    "soft_triplet": losses.soft_triplet_loss,
    "batch_classification": losses.batch_classification_loss,
}
IN_BATCH_KS = (1, 5, 10)


def get_loss_fn(loss_config):
  if loss_config.name not in LOSSES:
    raise ValueError(f"unknown loss {loss_config.name!r}; valid losses: {sorted(LOSSES)}")
  return functools.partial(LOSSES[loss_config.name], kernel=loss_config.kernel)


def make_train_step(model, tx, loss_config, mesh):
  """Returns step(state, batch) -> (state, metrics), jitted with the state donated."""
  loss_fn = get_loss_fn(loss_config)
  replicated = sharding.replicated(mesh)

  def step(state, batch):
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def objective(params):
      (query, target, aux), updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch, train=True,
          rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
      loss = losses.global_batch_loss(loss_fn, query, target, mesh,
                                      negatives=loss_config.negatives)
      return loss, (query, target, aux, updates)

    (loss, (query, target, aux, updates)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, param_updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.global_norm(grads),
        "param_norm": optax.global_norm(params),
        "norm_scale": aux["scale"],
    }
    recall = retrieval.in_batch_recall(query, target, ks=IN_BATCH_KS, mesh=mesh)
    metrics.update({f"batch_{k}": v for k, v in recall.items()})
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=updates.get("batch_stats", state.batch_stats),
                              opt_state=opt_state)
    return new_state, metrics

  return jax.jit(step, donate_argnums=(0,), out_shardings=(replicated, replicated))


def load_vocabulary(train_split, workdir) -> Vocabulary:
  """The training-caption vocabulary, saved in the workdir so evaluation reuses it."""
  path = pathlib.Path(workdir) / "vocab.json"
  if path.exists():
    return Vocabulary.load(path)
  vocab = Vocabulary.build(train_split.texts)
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    vocab.save(path)
  return vocab


def setup(config, workdir, log):
  """Mesh, data, vocabulary, model, optimiser and train state (restored if possible)."""
  if config.distributed:
    jax.distributed.initialize()
  mesh = sharding.make_mesh()
  sharding.local_batch_size(config.batch_size, mesh)  # fail before any compilation
  sharding.local_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  train_split = registry.load_split(config.data, config.data.train_split, log=log)
  vocab = load_vocabulary(train_split, workdir)
  model = build_lib.build_model(config.model, len(vocab))
  tx = optim.make_optimizer(config.optimizer)
  train_data = pipeline.TrainPipeline(train_split, vocab, config.data.max_text_len,
                                      config.batch_size, mesh, config.seed,
                                      config.data.image_size, log=log)
  example = next(iter(train_data.dataset(0).take(1).as_numpy_iterator()))
  example = {k: jax.ShapeDtypeStruct((config.batch_size,) + v.shape[1:], v.dtype)
             for k, v in example.items()}
  state = train_state_lib.create_train_state(model, tx, example, config.seed, mesh)
  return mesh, vocab, model, tx, train_data, state


def restore_or_init(config, manager, state, log):
  """Resume order: workdir checkpoint, then config.resume, then config.init_from, then scratch."""
  state, step = checkpoint.restore_latest(manager, state)
  if step is not None:
    log(f"resumed from {manager.directory} at step {step}")
    return state
  if config.resume:
    state, step = checkpoint.restore_from_directory(config.resume, state)
    log(f"resumed from {config.resume} at step {step}")
    return state
  if config.init_from:
    raise NotImplementedError(
        f"config.init_from={config.init_from!r}: pretrained initialisation of "
        f"{config.model.image_encoder!r}/{config.model.text_encoder!r} is not wired yet")
  log("training from scratch")
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if a checkpoint is there) and evaluates.

  Returns:
    The final evaluation results (also written to `<workdir>/results.json`).
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  log = log_lib.Logger(workdir)
  mesh, vocab, model, tx, train_data, state = setup(config, workdir, log)
  log(f"mesh: {mesh.size} device(s) over {jax.process_count()} process(es); "
      f"global batch {config.batch_size}")
  manager = checkpoint.make_manager(workdir, config.keep_checkpoints)
  state = restore_or_init(config, manager, state, log)
  start = int(jax.device_get(state.step))
  train_step = make_train_step(model, tx, config.loss, mesh)
  evaluator = evaluate_lib.Evaluator(config, model, vocab, mesh, log=log)
  writer = log_lib.SummaryWriter(workdir)
  schedule = optim.learning_rate_schedule(config.optimizer)
  progress = log_lib.Progress(config.num_train_steps, start, config.batch_size)
  results = {}
  batches = train_data.batches(start)
  for step in range(start + 1, config.num_train_steps + 1):
    state, metrics = train_step(state, next(batches))
    if step == start + 1 or step % config.log_every_steps == 0 or step == config.num_train_steps:
      metrics = jax.device_get(metrics)
      loss = float(metrics["loss"])
      if not np.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}; stopping without saving")
      metrics["learning_rate"] = float(schedule(step - 1))
      metrics.update(progress.update(step))
      writer.scalars(step, metrics)
      log(progress.line(step, metrics))
    if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
      checkpoint.save(manager, step, state)
    if step % config.eval_every_steps == 0 or step == config.num_train_steps:
      results = evaluator.evaluate({"params": state.params, "batch_stats": state.batch_stats})
      writer.scalars(step, {f"eval/{k}": v for k, v in results["metrics"].items()})
      log(evaluate_lib.format_table(results))
  manager.wait_until_finished()
  if not results:  # nothing left to train: evaluate the restored state
    results = evaluator.evaluate({"params": state.params, "batch_stats": state.batch_stats})
    log(evaluate_lib.format_table(results))
  results["step"] = int(jax.device_get(state.step))
  evaluate_lib.write_results(workdir, results)
  writer.close()
  return results


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from cir_jax.utils import flags as flags_lib  # pylint: disable=g-import-not-at-top
  flags_lib.define_flags()
  app.run(main)
