"""Optax helpers for parameter groups: freezing and per-module learning-rate multipliers.

Parameters are addressed by their '/'-joined path in the params tree, e.g.
`image_encoder/encoder/layers_3/mlp/fc1/kernel`, and selected with regular
expressions (`re.search`). A pattern that selects nothing is an error: a typo
must not silently leave a backbone trainable.

  tx = optax.adamw(1e-4)
  tx = optax.chain(tx, param_groups.scale_by_multipliers(params, [(r'^image_encoder/', 0.1)]))
  tx = param_groups.freeze(tx, params, [r'^text_encoder/embeddings/'])
"""
import re
from typing import Sequence

import jax
import numpy as np
import optax

FROZEN = "frozen"
TRAINABLE = "trainable"


def path_str(path) -> str:
  """A jax.tree_util key path -> 'a/b/c'."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def param_paths(params) -> list[str]:
  """'/'-joined paths of all leaves of `params`, in tree order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _check_patterns(params, patterns: Sequence[str], what: str) -> list[re.Pattern]:
  compiled = [re.compile(p) for p in patterns]
  paths = param_paths(params)
  for pattern in compiled:
    if not any(pattern.search(p) for p in paths):
      raise ValueError(f"{what} pattern {pattern.pattern!r} matches no parameter; paths look "
                       f"like {paths[:3]}")
  return compiled


def frozen_labels(params, patterns: Sequence[str]):
  """Tree of 'frozen'/'trainable' labels: frozen where a pattern matches the path."""
  compiled = _check_patterns(params, patterns, "freeze")
  return jax.tree_util.tree_map_with_path(
      lambda p, _: FROZEN if any(c.search(path_str(p)) for c in compiled) else TRAINABLE,
      params)


def freeze(tx: optax.GradientTransformation, params,
           patterns: Sequence[str]) -> optax.GradientTransformation:
  """Wraps `tx` so parameters matching any pattern get zero updates.

  Frozen parameters go through `optax.set_to_zero`, so `tx` keeps no state for
  them (no Adam moments for a frozen backbone) and weight decay does not touch
  them.

  Args:
    tx: the optimizer for the trainable parameters.
    params: the params tree (or its shapes) the labels are computed from.
    patterns: regexes over '/'-joined parameter paths.

  Returns:
    An optax.GradientTransformation over the full tree.
  """
  if not patterns:
    return tx
  labels = frozen_labels(params, patterns)
  return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


def _factor_fn(params, rules: Sequence[tuple[str, float]]):
  """path -> multiplier of the first matching rule (1 if none); patterns checked on params."""
  compiled = _check_patterns(params, [r for r, _ in rules], "multiplier")
  factors = [float(f) for _, f in rules]

  def factor(path) -> float:
    name = path_str(path)
    for pattern, f in zip(compiled, factors):
      if pattern.search(name):
        return f
    return 1.0

  return factor


def multipliers(params, rules: Sequence[tuple[str, float]]):
  """Tree of per-parameter learning-rate multipliers; the first matching rule wins, else 1."""
  factor = _factor_fn(params, rules)
  return jax.tree_util.tree_map_with_path(lambda path, _: factor(path), params)


def scale_by_multipliers(params, rules: Sequence[tuple[str, float]]
                         ) -> optax.GradientTransformation:
  """Scales each update by its multiplier (chain it AFTER the optimizer).

  Scaling the final update is the same as scaling that module's learning rate
  (including decoupled weight decay, as with per-group lr in PyTorch).

  Args:
    params: the params tree (or its shapes); used to validate the patterns.
    rules: (regex, multiplier) pairs, first match wins; unmatched params get 1.

  Returns:
    A stateless optax.GradientTransformation. It reads the multiplier from each
    update's path, so it also works inside `freeze` (whose inner optimizer sees
    masked-out subtrees).
  """
  factor = _factor_fn(params, rules)

  def scale(path, update):
    f = factor(path)
    return update if f == 1.0 else update * np.asarray(f, update.dtype)

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def summary(params, freeze_patterns: Sequence[str] = (),
            multiplier_rules: Sequence[tuple[str, float]] = (), per_param: bool = True) -> str:
  """A table of which parameters are frozen/trainable, their sizes and multipliers.

  Args:
    params: the params tree (arrays or ShapeDtypeStructs).
    freeze_patterns, multiplier_rules: as given to `freeze` / `scale_by_multipliers`.
    per_param: list every parameter, not only the totals.

  Returns:
    Printable text ending with the frozen / trainable totals.
  """
  labels = jax.tree.leaves(frozen_labels(params, freeze_patterns)) if freeze_patterns else None
  factors = jax.tree.leaves(multipliers(params, multiplier_rules)) if multiplier_rules else None
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  lines, totals = [], {FROZEN: [0, 0], TRAINABLE: [0, 0]}
  for i, (path, leaf) in enumerate(leaves):
    label = labels[i] if labels else TRAINABLE
    size = int(np.prod(leaf.shape))
    totals[label][0] += 1
    totals[label][1] += size
    if per_param:
      mult = f" x{factors[i]:g}" if factors and label == TRAINABLE else ""
      lines.append(f"{label:9s} {size:>12,d} {str(tuple(leaf.shape)):>18s} {path_str(path)}{mult}")
  for label in (TRAINABLE, FROZEN):
    arrays, size = totals[label]
    lines.append(f"{label}: {arrays} arrays, {size:,d} parameters")
  return "\n".join(lines)
