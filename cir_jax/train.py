"""Trainer: `train_and_evaluate(config, workdir)` and a thin command line.

  python -m cir_jax.train --config configs/tirg_css.py --workdir runs/css [--config.batch_size=64]

One jitted step over a data-parallel mesh (works unchanged on 1 device, many
devices and many processes), the state donated, the loss over the global batch
through an explicit all-gather, in-batch Recall@K on device, host syncs only on
logging steps, Orbax checkpoints with automatic resume, TensorBoard summaries,
periodic gallery evaluation and a results JSON in the workdir.
"""
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cir_jax import checkpoint
from cir_jax import divergence
from cir_jax import evaluate as evaluate_lib
from cir_jax import experiment as experiment_lib
from cir_jax import feature_cache
from cir_jax import losses
from cir_jax import optim
from cir_jax import preemption
from cir_jax import retrieval
from cir_jax import seeds as seeds_lib
from cir_jax import sharding
from cir_jax import xla_cpu
from cir_jax.data import device_data
from cir_jax.data import feature_data
from cir_jax.utils import logging as log_lib
from cir_jax.utils import workdir as workdir_lib

IN_BATCH_KS = (1, 5, 10)
# Scalars that must be finite before anything is logged or saved: a non-finite
# param_norm (of the updated params) catches NaN weights even when the loss of
# that step was still finite.
FINITE_METRICS = ("loss", "grad_norm", "param_norm")
# Training inputs whose batch is drawn inside the step from device-resident tables.
IN_STEP_DATA = (device_data.DeviceTrainData, feature_data.FeatureTrainData)


def make_train_step(model, tx, loss_config, mesh, data=None, num_seeds: int = 1,
                    first_seed: int = 0, steps_per_call: int = 1):
  """Returns step(state, inputs) -> (state, metrics), jitted with the state donated.

  `inputs` is a batch (dict of global arrays, what TrainPipeline or HostFeatureData
  yields) or, with `data` a DeviceTrainData or FeatureTrainData, its device-resident
  `data.tables`: the step then draws batch `state.step` itself
  (cir_jax/data/device_data.py, cir_jax/data/feature_data.py).

  With num_seeds = S > 1 the state is S stacked replicas (cir_jax/seeds.py) and
  the step is vmapped over them: host batches are stacked too ([S, B, ...]),
  device data draw replica i's batch in the order of seed first_seed + i; every
  metric comes back as [S].

  With steps_per_call = K > 1 one call runs K consecutive steps in a `lax.scan`
  (the same steps, in order) and every metric comes back stacked, [K] or [K, S];
  host `inputs` are then a sequence of K batches (device data: the tables, as
  for one step). Why: XLA:CPU maps its temporary buffer afresh on every
  execution, so every step touches new zero pages (58k page faults per ResNet-18
  step at 64 px, 12% of its CPU time); one call of K steps maps it once
  (docs/benchmarks.md).
  """
  if steps_per_call < 1:
    raise ValueError(f"steps_per_call={steps_per_call} must be >= 1")
  loss_fn, loss_spec = losses.get_loss(loss_config)
  replicated = sharding.replicated(mesh)

  def one_replica(state, inputs, seed):
    batch = inputs if data is None else data.batch(inputs, state.step, seed)
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def objective(params):
      (query, target, aux), updates = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch, train=True,
          rngs={"dropout": dropout_rng}, mutable=["batch_stats"])
      # global_batch_loss folds `rng` with the device index: independent sets per device.
      rng_kw = {"rng": jax.random.fold_in(dropout_rng, 1)} if loss_spec.takes_rng else {}
      per_query = {k: aux[k] for k in loss_spec.query_inputs if k in aux}
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

  if num_seeds == 1:
    step = lambda state, inputs: one_replica(state, inputs, None)
  else:
    def step(state, inputs):
      seeds = first_seed + jnp.arange(num_seeds, dtype=jnp.int32)
      return jax.vmap(one_replica, in_axes=(0, 0 if data is None else None, 0))(
          state, inputs, seeds)
  if steps_per_call > 1:
    step = _scanned(step, steps_per_call, host_batches=data is None)
  return jax.jit(step, donate_argnums=(0,), out_shardings=(replicated, replicated),
                 compiler_options=xla_cpu.train_compiler_options())


def _scanned(step, k: int, host_batches: bool):
  """step(state, inputs) run k times in one lax.scan; metrics stacked [k, ...].

  Host inputs: a sequence of k batches, stacked inside the program (the scan's
  xs); otherwise the same `inputs` (device-resident tables) for every step.
  """
  def steps(state, inputs):
    if not host_batches:
      return jax.lax.scan(lambda s, _: step(s, inputs), state, None, length=k)
    if len(inputs) != k:
      raise ValueError(f"a call of steps_per_call={k} steps takes {k} host batches, "
                       f"got {len(inputs)}")
    return jax.lax.scan(step, state, jax.tree.map(lambda *b: jnp.stack(b), *inputs))
  return steps


def call_sizes(start: int, num_steps: int, steps_per_call: int, intervals=()):
  """How many steps each call runs, from step `start` (done) to `num_steps`.

  A call of steps_per_call = K steps covers a block (n K, (n + 1) K] in which no
  step but the last is a multiple of an interval in `intervals` (logging,
  checkpoint, evaluation: the trainer needs the state, or that step's metrics,
  between calls there); every other step runs alone. So each logged, saved or
  evaluated step ends a call, a run resumed off a multiple of K (a checkpoint
  saved when preempted) runs single steps up to the next one, and with intervals
  that are multiples of K every full block is one call.
  """
  step, k = start, steps_per_call
  while step < num_steps:
    fits = (step % k == 0 and step + k <= num_steps and
            not any(j % i == 0 for i in intervals for j in range(step + 1, step + k)))
    size = k if fits else 1
    yield size
    step += size


def call_inputs(batches, k: int):
  """The host inputs of one call of k steps from the iterator `batches`: its next
  batch for k = 1, else a tuple of its next k (what make_train_step's scan takes)."""
  return next(batches) if k == 1 else tuple(next(batches) for _ in range(k))


def _inputs(train_data, start: int):
  """(next_inputs(k), close()): what a call of k steps takes, host batches
  (`call_inputs`) or the same device-resident tables; close stops the pipeline."""
  if isinstance(train_data, IN_STEP_DATA):
    return lambda k: train_data.tables, lambda: None
  batches = train_data.batches(start)
  return lambda k: call_inputs(batches, k), batches.close


def _last_step(metrics, k: int):
  """The metrics of a call's last step (a call of k > 1 steps stacks them [k, ...])."""
  return metrics if k == 1 else jax.tree.map(lambda m: m[-1], metrics)


def check_finite(metrics: dict, step: int, when: str):
  """Raises FloatingPointError naming the step if a FINITE_METRICS scalar is NaN/inf."""
  bad = {k: np.asarray(metrics[k]).tolist() for k in FINITE_METRICS
         if not np.isfinite(np.asarray(metrics[k], np.float64)).all()}  # [S] with several seeds
  if bad:
    raise FloatingPointError(
        f"non-finite {bad} at step {step} ({when}); stopping without saving. Finiteness is "
        f"checked on every logging step and before every checkpoint save, so no saved "
        f"checkpoint holds NaN/inf; lower the learning rate or enable optimizer.grad_clip_norm")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if a checkpoint is there) and evaluates.

  SIGTERM/SIGINT during training save a checkpoint of the step reached and
  return early (see cir_jax/preemption.py); rerunning the same command resumes
  exactly where it stopped.

  Returns:
    The final evaluation results (also written to `<workdir>/results.json`), or
    {'preempted': True, 'step', 'signal'} if a signal stopped training.
  """
  experiment_lib.check_config(config)  # a bad name fails before any file is written
  workdir = workdir_lib.check_workdir(workdir, create=True)
  log = log_lib.Logger(workdir)
  experiment, train_data = experiment_lib.setup_training(config, workdir, log)
  mesh, model = experiment.mesh, experiment.model
  log(f"mesh: {mesh.size} device(s) over {jax.process_count()} process(es); "
      f"global batch {config.batch_size}")
  manager = checkpoint.make_manager(workdir, config.keep_checkpoints, log)
  experiment = experiment_lib.restore_or_init(experiment, manager, log)
  if isinstance(train_data, feature_cache.Pending):  # frozen towers: run them once, now
    train_data = train_data.build(experiment, workdir, log)
  state = experiment.state
  start = seeds_lib.current_step(state)
  num_seeds = seeds_lib.num_seeds(config)
  evaluator = evaluate_lib.make_evaluator(config, model, experiment.vocab, mesh, log=log)
  writer = log_lib.SummaryWriter(workdir, start_step=start)  # drops rows past `start`
  monitor = divergence.Monitor(config.divergence, log_lib.read_metrics(workdir, start), log)
  schedule = optim.learning_rate_schedule(config.optimizer)
  progress = log_lib.Progress(config.num_train_steps, start, config.batch_size)
  results = {}
  on_device = isinstance(train_data, IN_STEP_DATA)
  steps_per_call = config.get("steps_per_call", 1)
  step_fns = {}  # calls of steps_per_call steps, and of single steps where those do not fit

  def train_step(k):
    if k not in step_fns:
      step_fns[k] = make_train_step(model, experiment.tx, config.loss, mesh,
                                    data=train_data if on_device else None,
                                    num_seeds=num_seeds, first_seed=config.seed,
                                    steps_per_call=k)
    return step_fns[k]

  next_inputs, close_inputs = _inputs(train_data, start)
  stop = preemption.StopRequest(config.preemption_sync_every_steps)
  step = start
  with stop:
    intervals = (config.log_every_steps, config.checkpoint_every_steps, config.eval_every_steps)
    sizes = list(call_sizes(start, config.num_train_steps, steps_per_call, intervals))
    if steps_per_call > 1:
      blocks = sum(size for size in sizes if size == steps_per_call)
      rest = sum(sizes) - blocks
      log(f"{steps_per_call} steps per call: {blocks} of the {sum(sizes)} steps to run"
          + (f"; {rest} one per call (logging, checkpoint and eval steps end a call)"
             if rest else ""))
    for k in sizes:
      state, metrics = train_step(k)(state, next_inputs(k))
      first, step = step == start, step + k
      last = step == config.num_train_steps
      stopping = not last and stop.requested(step, steps_done=k)
      logging = first or step % config.log_every_steps == 0 or last or stopping
      if logging:
        metrics = _last_step(jax.device_get(metrics), k)
        check_finite(metrics, step, "logging step")
        if num_seeds > 1:  # log the mean (+ each seed's loss), check the worst replica
          metrics, worst = seeds_lib.host_scalars(metrics)
          monitor.check(step, worst, "logging step")
        else:
          monitor.check(step, metrics, "logging step")
        metrics["learning_rate"] = float(schedule(step - 1))
        metrics.update(progress.update(step))
        writer.scalars(step, metrics)
        log(progress.line(step, metrics))
      if step % config.checkpoint_every_steps == 0 or last or stopping:
        scalars = {m: metrics[m] for m in FINITE_METRICS}  # on the host if logged
        if not logging:
          scalars = _last_step(jax.device_get(scalars), k)
        check_finite(scalars, step, "before saving a checkpoint")
        if num_seeds > 1 and np.ndim(scalars["loss"]):
          scalars = seeds_lib.host_scalars(scalars)[1]
        monitor.check(step, scalars, "before saving a checkpoint")
        checkpoint.save(manager, step, state, {checkpoint.LOSS_METRIC: monitor.median_loss()})
      if stopping:
        manager.wait_until_finished()
        manager.close()
        close_inputs()
        writer.close()
        log(f"{stop.name}: saved a checkpoint at step {step} and stopped; run the same "
            f"command to resume from it")
        return {"preempted": True, "step": step, "signal": stop.name}
      if step % config.eval_every_steps == 0 or last:
        eval_start = time.perf_counter()
        results = evaluate_lib.evaluate_state(evaluator, state, config)
        writer.scalars(step, {**{f"eval/{name}": v for name, v in results["metrics"].items()},
                              "perf/eval_sec": time.perf_counter() - eval_start})
        log(evaluate_lib.format_table(results))
  log(progress.summary())  # `make demo` reports its training examples/s here
  manager.wait_until_finished()
  manager.close()
  close_inputs()  # stops the input pipeline's prefetching threads now, not at exit
  if not results:  # nothing left to train: evaluate the restored state
    results = evaluate_lib.evaluate_state(evaluator, state, config)
    log(evaluate_lib.format_table(results))
  results["step"] = seeds_lib.current_step(state)
  evaluate_lib.write_results(workdir, results)
  writer.close()
  return results



if __name__ == "__main__":
  from cir_jax.utils import flags as flags_lib  # pylint: disable=g-import-not-at-top
  flags_lib.run(train_and_evaluate, creates_workdir=True)
