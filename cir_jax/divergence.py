"""Stops a diverging run before it is saved: loss or weight norm far above their recent level.

NaN/inf are caught by `train.check_finite`, but a run can blow up and stay finite
(issue 15: learning rate 1e6, loss 0.42 -> 485, param_norm 87.6 -> 3.6M); saving
those steps would rotate the good checkpoints away. `Monitor.check` runs on every
logging step and before every checkpoint save, on the host-side scalars the
trainer already fetched, and raises `DivergenceError` when, with at least
`min_history` earlier checked steps among the last `window` (config.divergence):

  loss       > loss_factor * max(median(recent losses), loss_floor)       or
  param_norm > param_norm_factor * median(recent param norms)

The median ignores single spikes in the history; `loss_floor` keeps a loss that is
near 0 from turning tiny absolute increases into a factor. Every loss of this
project is >= 0. A resumed run seeds its history from the `metrics.jsonl` rows up
to the restored step, so a divergence right after a resume is caught too.
`enabled=False` only turns the stop off: the history is still kept, because the
checkpoint rotation ranks checkpoints by its median loss (cir_jax/checkpoint.py).
"""
import collections
from typing import Iterable

import jax
import numpy as np
from jax.experimental import multihost_utils


class DivergenceError(RuntimeError):
  """Training diverged (finite but far off its recent level); nothing of it was saved."""


class Monitor:
  """Recent (loss, param_norm) of checked steps and the divergence rule of the module docstring."""

  def __init__(self, config, history: Iterable[dict] = (), log=print):
    """`config`: config.divergence; `history`: earlier metrics rows ({'step', 'loss', ...})."""
    if config.window < 1 or config.min_history < 1 or config.min_history > config.window:
      raise ValueError(f"divergence.window={config.window} and divergence.min_history="
                       f"{config.min_history} need 1 <= min_history <= window")
    self.config, self.log = config, log
    self.values = collections.deque(maxlen=config.window)  # (step, loss, param_norm)
    rows = [r for r in history if "loss" in r and "param_norm" in r]
    for row in _same_on_all_processes(rows[-config.window:], config.window):
      self.values.append(tuple(row))

  def median_loss(self) -> float:
    return float(np.median([v[1] for v in self.values])) if self.values else float("inf")

  def check(self, step: int, metrics: dict, when: str):
    """Adds step's loss/param_norm to the history, after raising DivergenceError if it diverged.

    A step checked twice (logged and saved) counts once.
    """
    if self.values and self.values[-1][0] == step:
      return
    loss, norm = float(metrics["loss"]), float(metrics["param_norm"])
    c = self.config
    if c.enabled and len(self.values) >= c.min_history:
      n = len(self.values)
      median_loss = float(np.median([v[1] for v in self.values]))
      median_norm = float(np.median([v[2] for v in self.values]))
      base = max(median_loss, c.loss_floor)
      problems = []
      if loss > c.loss_factor * base:
        floor = f" (loss_floor; the median is {median_loss:.4g})" if base > median_loss else ""
        problems.append(f"loss {loss:.4g} > {c.loss_factor:g} x {base:.4g}{floor}, the median "
                        f"of the last {n} checked losses")
      if norm > c.param_norm_factor * median_norm:
        problems.append(f"param_norm {norm:.4g} > {c.param_norm_factor:g} x {median_norm:.4g}, "
                        f"the median of the last {n} checked param norms")
      if problems:
        message = (f"training diverged at step {step} ({when}): {'; '.join(problems)}. "
                   f"Stopped without saving this step, so the newest checkpoint is from "
                   f"before; lower optimizer.learning_rate or set optimizer.grad_clip_norm, or "
                   f"tune config.divergence (enabled=False turns this check off)")
        self.log(message)
        raise DivergenceError(message)
    self.values.append((step, loss, norm))


def _same_on_all_processes(rows: list, window: int) -> list:
  """Process 0's rows on every process (only it writes metrics.jsonl), so all decide alike."""
  table = np.array([[r["step"], r["loss"], r["param_norm"]] for r in rows],
                   np.float64).reshape(-1, 3)
  if jax.process_count() == 1:
    return [(int(r[0]), r[1], r[2]) for r in table]
  padded = np.full((window, 3), np.nan)
  padded[:len(table)] = table
  padded = multihost_utils.broadcast_one_to_all(padded)
  return [(int(r[0]), r[1], r[2]) for r in np.asarray(padded) if not np.isnan(r[0])]
