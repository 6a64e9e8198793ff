"""Optimiser and learning-rate schedule from `config.optimizer`.

Parameter groups (`cir_jax.param_groups`), all optional and addressed by
regexes over '/'-joined parameter paths (e.g. '^image_encoder/'):
* `freeze`: never updated (no optimiser state, no weight decay);
* `lr_multipliers`: ((regex, factor), ...), first match wins;
* `freeze_after` + `freeze_after_steps`: updated for the first N steps, then
  fixed (SSN on FashionIQ fixes the image encoder after one epoch).
They need the params tree (or its shapes): `make_optimizer(opt_config, params)`.
"""
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from cir_jax import param_groups

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "linear")


def learning_rate_schedule(opt_config) -> optax.Schedule:
  """Linear warm-up, then piecewise-constant decay by `decay_factor` at `decay_steps`
  ('step'), or a linear decay to 0 at `total_steps` ('linear', CIRPLANT)."""
  base = opt_config.learning_rate
  kind = opt_config.get("schedule", "step")
  if kind == "step":
    boundaries = {int(s): opt_config.decay_factor for s in opt_config.decay_steps}
    decay = optax.piecewise_constant_schedule(base, boundaries)
  elif kind == "linear":
    total = int(opt_config.get("total_steps", 0))
    if total <= opt_config.warmup_steps:
      raise ValueError(f"optimizer.schedule='linear' needs optimizer.total_steps > warmup_steps "
                       f"({opt_config.warmup_steps}), got {total}")
    decay = optax.linear_schedule(base, 0.0, total - opt_config.warmup_steps)
  else:
    raise ValueError(f"unknown optimizer.schedule {kind!r}; valid: {list(SCHEDULES)}")
  if not opt_config.warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, base, opt_config.warmup_steps)
  after = decay
  if kind == "step":  # its decay_steps are absolute steps
    after = lambda s: decay(s + opt_config.warmup_steps)
  return optax.join_schedules([warmup, after], [opt_config.warmup_steps])


def zero_updates_after(params, patterns, steps: int) -> optax.GradientTransformation:
  """Zeroes the updates of parameters matching `patterns` from step `steps` on.

  Chain it after the optimizer: the final update (weight decay included) is
  multiplied by 0, so the parameters stay exactly at their step-`steps` values.
  The step count lives in the optimiser state, so it survives checkpoints.

  Args:
    params: the params tree (or its shapes), to validate the patterns.
    patterns: regexes over '/'-joined parameter paths; each must match.
    steps: number of steps during which the parameters are still updated.
  """
  param_groups.frozen_labels(params, patterns)  # a pattern matching nothing is an error
  compiled = [re.compile(p) for p in patterns]

  def init_fn(_):
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    keep = state.count < steps

    def mask(path, update):
      if any(c.search(param_groups.path_str(path)) for c in compiled):
        return jnp.where(keep, update, jnp.zeros_like(update))
      return update

    return (jax.tree_util.tree_map_with_path(mask, updates),
            optax.ScaleByScheduleState(count=state.count + 1))

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(opt_config, params: Optional[Any] = None) -> optax.GradientTransformation:
  """SGD with momentum and PyTorch-style (coupled) weight decay, as google/tirg, or AdamW.

  Args:
    opt_config: `config.optimizer`.
    params: the params tree or its shapes (`jax.eval_shape`); required when
      freeze / lr_multipliers / freeze_after are set.
  """
  schedule = learning_rate_schedule(opt_config)
  chain = []
  if opt_config.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  if opt_config.name == "sgd":
    if opt_config.weight_decay:
      chain.append(optax.add_decayed_weights(opt_config.weight_decay))
    chain.append(optax.sgd(schedule, momentum=opt_config.momentum or None))
  elif opt_config.name == "adamw":
    chain.append(optax.adamw(schedule, weight_decay=opt_config.weight_decay))
  else:
    raise ValueError(f"unknown optimizer {opt_config.name!r}; valid optimizers: {list(OPTIMIZERS)}")
  freeze = tuple(opt_config.get("freeze", ()))
  multipliers = tuple(tuple(rule) for rule in opt_config.get("lr_multipliers", ()))
  freeze_after = tuple(opt_config.get("freeze_after", ()))
  if (freeze or multipliers or freeze_after) and params is None:
    raise ValueError("optimizer.freeze / lr_multipliers / freeze_after need the params: call "
                     "make_optimizer(opt_config, params)")
  if multipliers:
    chain.append(param_groups.scale_by_multipliers(params, multipliers))
  if freeze_after:
    chain.append(zero_updates_after(params, freeze_after, int(opt_config.freeze_after_steps)))
  return param_groups.freeze(optax.chain(*chain), params, freeze)
