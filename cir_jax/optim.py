"""Optimiser and learning-rate schedule from `config.optimizer`."""
import optax

OPTIMIZERS = ("sgd", "adamw")


def learning_rate_schedule(opt_config) -> optax.Schedule:
  """Linear warm-up, then piecewise-constant decay by `decay_factor` at `decay_steps`."""
  base = opt_config.learning_rate
  boundaries = {int(s): opt_config.decay_factor for s in opt_config.decay_steps}
  decay = optax.piecewise_constant_schedule(base, boundaries)
  if not opt_config.warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, base, opt_config.warmup_steps)
  return optax.join_schedules([warmup, lambda s: decay(s + opt_config.warmup_steps)],
                              [opt_config.warmup_steps])


def make_optimizer(opt_config) -> optax.GradientTransformation:
  """SGD with momentum and PyTorch-style (coupled) weight decay, as google/tirg, or AdamW."""
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
  return optax.chain(*chain)
