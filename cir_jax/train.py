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
from cir_jax import init_from as init_from_lib
from cir_jax import losses
from cir_jax import multihost
from cir_jax import optim
from cir_jax import preemption
from cir_jax import retrieval
from cir_jax import sharding
from cir_jax import train_state as train_state_lib
from cir_jax.data import pipeline
from cir_jax.data import registry
from cir_jax.data.tokenizer_vocab import TokenizerVocabulary
from cir_jax.data.vocab import Vocabulary
from cir_jax.models import build as build_lib
from cir_jax.utils import logging as log_lib

LOSSES = {
    "soft_triplet": losses.soft_triplet_loss,
    "batch_classification": losses.batch_classification_loss,
    "general_k": losses.general_k_loss,
    "batch_hard_triplet": losses.batch_hard_triplet_loss,
    "temperature_ce": losses.temperature_cross_entropy,
    "ssn": losses.ssn_loss,
}
# The `config.loss` fields each loss reads (besides name and negatives).
_LOSS_OPTIONS = {
    "soft_triplet": lambda c: {"kernel": c.kernel},
    "batch_classification": lambda c: {"kernel": c.kernel},
    "general_k": lambda c: {"kernel": c.kernel, "k": c.k, "m": c.m or None},  # m=0: every set
    "batch_hard_triplet": lambda c: {"margin": c.margin},
    "temperature_ce": lambda c: {"temperature": c.temperature},
    "ssn": lambda c: {"temperature": c.temperature, "kl_weight": c.kl_weight},
}
# Per-query inputs a loss reads from the model's aux (sharded like the queries).
_LOSS_QUERY_INPUTS = {"ssn": ("negative_query",),
                      "soft_triplet": ("set_negatives", "set_negative_mask")}
# Losses that sample (Eq. 4's sets) and take an `rng`, derived from the step's rng.
LOSSES_WITH_RNG = ("general_k",)
IN_BATCH_KS = (1, 5, 10)
# Scalars that must be finite before anything is logged or saved: a non-finite
# param_norm (of the updated params) catches NaN weights even when the loss of
# that step was still finite.
FINITE_METRICS = ("loss", "grad_norm", "param_norm")


def get_loss_fn(loss_config):
  if loss_config.name not in LOSSES:
    raise ValueError(f"unknown loss {loss_config.name!r}; valid losses: {sorted(LOSSES)}")
  return functools.partial(LOSSES[loss_config.name], **_LOSS_OPTIONS[loss_config.name](loss_config))


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
      # global_batch_loss folds `rng` with the device index: independent sets per device.
      rng_kw = ({"rng": jax.random.fold_in(dropout_rng, 1)}
                if loss_config.name in LOSSES_WITH_RNG else {})
      per_query = {k: aux[k] for k in _LOSS_QUERY_INPUTS.get(loss_config.name, ()) if k in aux}
      loss = losses.global_batch_loss(loss_fn, query, target, mesh,
                                      negatives=loss_config.negatives, per_query=per_query,
                                      **rng_kw)
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


def load_vocabulary(train_split, workdir, tokenizer: str = "vocab"):
  """The training-caption vocabulary, saved in the workdir so evaluation reuses it.

  With `tokenizer` a local Hugging Face tokenizer directory (config.data.tokenizer)
  that tokenizer is used instead (pretrained text encoders).
  """
  if tokenizer != "vocab":
    return TokenizerVocabulary(tokenizer)
  path = pathlib.Path(workdir) / "vocab.json"
  if path.exists():
    return Vocabulary.load(path)
  # Every process builds the same vocabulary from the same captions; process 0
  # also saves it, via a rename so that no process can read a half-written file.
  vocab = Vocabulary.build(train_split.texts)
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    vocab.save(partial)
    partial.replace(path)
  return vocab


def check_finite(metrics: dict, step: int, when: str):
  """Raises FloatingPointError naming the step if a FINITE_METRICS scalar is NaN/inf."""
  bad = {k: float(metrics[k]) for k in FINITE_METRICS if not np.isfinite(float(metrics[k]))}
  if bad:
    raise FloatingPointError(
        f"non-finite {bad} at step {step} ({when}); stopping without saving. Finiteness is "
        f"checked on every logging step and before every checkpoint save, so no saved "
        f"checkpoint holds NaN/inf; lower the learning rate or enable optimizer.grad_clip_norm")


def setup(config, workdir, log):
  """Mesh, data, vocabulary, model, optimiser and train state (restored if possible)."""
  multihost.initialize(config)  # first: JAX cannot join a cluster once a backend exists
  mesh = sharding.make_mesh()
  sharding.local_batch_size(config.batch_size, mesh)  # fail before any compilation
  sharding.local_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  train_split = registry.load_split(config.data, config.data.train_split, log=log)
  build_lib.check_tokenizer(config.model, config.data.get("tokenizer", "vocab"))
  vocab = load_vocabulary(train_split, workdir, config.data.get("tokenizer", "vocab"))
  model = build_lib.build_model(config.model, len(vocab))
  if config.loss.get("set_negatives", 0) and config.loss.name != "soft_triplet":
    raise ValueError(f"loss.set_negatives={config.loss.set_negatives} is read only by the "
                     f"soft_triplet loss, not by loss.name={config.loss.name!r}")
  train_data = pipeline.TrainPipeline(train_split, vocab, config.data.max_text_len,
                                      config.batch_size, mesh, config.seed,
                                      config.data.image_size, log=log,
                                      set_negatives=config.loss.get("set_negatives", 0))
  example = next(iter(train_data.dataset(0).take(1).as_numpy_iterator()))
  example = {k: jax.ShapeDtypeStruct((config.batch_size,) + v.shape[1:], v.dtype)
             for k, v in example.items()}
  # The optimizer's parameter groups (freezing, lr multipliers) need the params' paths.
  params_shape = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                         {k: jnp.zeros(v.shape, v.dtype) for k, v in example.items()},
                         train=False))["params"]
  tx = optim.make_optimizer(config.optimizer, params_shape)
  state = train_state_lib.create_train_state(model, tx, example, config.seed, mesh)
  return mesh, vocab, model, tx, train_data, state


def restore_or_init(config, manager, state, log, model=None):
  """Resume order: workdir checkpoint, then config.resume, then config.init_from, then scratch."""
  state, step = checkpoint.restore_latest(manager, state, log)
  if step is not None:
    log(f"resumed from {manager.directory} at step {step}")
    return state
  if config.resume:
    state, step = checkpoint.restore_from_directory(config.resume, state, log)
    log(f"resumed from {config.resume} at step {step}")
    return state
  if config.init_from or config.get("init_from_image") or config.get("init_from_text"):
    if model is None:
      raise ValueError("restore_or_init: config.init_from needs the model (pass model=...)")
    return init_from_lib.load_into_state(config, model, state, log)
  log("training from scratch")
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if a checkpoint is there) and evaluates.

  SIGTERM/SIGINT during training save a checkpoint of the step reached and
  return early (see cir_jax/preemption.py); rerunning the same command resumes
  exactly where it stopped.

  Returns:
    The final evaluation results (also written to `<workdir>/results.json`), or
    {'preempted': True, 'step', 'signal'} if a signal stopped training.
  """
  get_loss_fn(config.loss)  # a bad loss name fails before loading data or compiling
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  log = log_lib.Logger(workdir)
  mesh, vocab, model, tx, train_data, state = setup(config, workdir, log)
  log(f"mesh: {mesh.size} device(s) over {jax.process_count()} process(es); "
      f"global batch {config.batch_size}")
  manager = checkpoint.make_manager(workdir, config.keep_checkpoints, log)
  state = restore_or_init(config, manager, state, log, model)
  start = int(jax.device_get(state.step))
  train_step = make_train_step(model, tx, config.loss, mesh)
  evaluator = evaluate_lib.Evaluator(config, model, vocab, mesh, log=log)
  writer = log_lib.SummaryWriter(workdir)
  schedule = optim.learning_rate_schedule(config.optimizer)
  progress = log_lib.Progress(config.num_train_steps, start, config.batch_size)
  results = {}
  batches = train_data.batches(start)
  stop = preemption.StopRequest(config.preemption_sync_every_steps)
  with stop:
    for step in range(start + 1, config.num_train_steps + 1):
      state, metrics = train_step(state, next(batches))
      last = step == config.num_train_steps
      stopping = not last and stop.requested(step)
      if step == start + 1 or step % config.log_every_steps == 0 or last or stopping:
        metrics = jax.device_get(metrics)
        check_finite(metrics, step, "logging step")
        metrics["learning_rate"] = float(schedule(step - 1))
        metrics.update(progress.update(step))
        writer.scalars(step, metrics)
        log(progress.line(step, metrics))
      if step % config.checkpoint_every_steps == 0 or last or stopping:
        check_finite(jax.device_get({k: metrics[k] for k in FINITE_METRICS}), step,
                     "before saving a checkpoint")
        checkpoint.save(manager, step, state)
      if stopping:
        manager.wait_until_finished()
        writer.close()
        log(f"{stop.name}: saved a checkpoint at step {step} and stopped; run the same "
            f"command to resume from it")
        return {"preempted": True, "step": step, "signal": stop.name}
      if step % config.eval_every_steps == 0 or last:
        eval_start = time.perf_counter()
        results = evaluator.evaluate({"params": state.params, "batch_stats": state.batch_stats})
        writer.scalars(step, {**{f"eval/{k}": v for k, v in results["metrics"].items()},
                              "perf/eval_sec": time.perf_counter() - eval_start})
        log(evaluate_lib.format_table(results))
  manager.wait_until_finished()
  if not results:  # nothing left to train: evaluate the restored state
    results = evaluator.evaluate({"params": state.params, "batch_stats": state.batch_stats})
    log(evaluate_lib.format_table(results))
  results["step"] = int(jax.device_get(state.step))
  evaluate_lib.write_results(workdir, results)
  writer.close()
  return results



if __name__ == "__main__":
  from cir_jax.utils import flags as flags_lib  # pylint: disable=g-import-not-at-top
  flags_lib.run(train_and_evaluate)
