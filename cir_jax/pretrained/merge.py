"""Putting loaded weights into a larger model's params (one tower of a retrieval model)."""
from typing import Any, Mapping, Sequence, Union

import numpy as np

from cir_jax.pretrained.trees import Path, flatten, fmt, mismatch_report, unflatten

def _as_path(path: Union[str, Sequence[str]]) -> Path:
  if isinstance(path, str):
    return tuple(p for p in path.split("/") if p)
  return tuple(path)


def merge_params(params: Mapping, loaded: Mapping, path: Union[str, Sequence[str]] = ()) -> dict:
  """Returns `params` with the sub-tree at `path` replaced by `loaded` (strict).

  The rest of `params` (freshly initialised heads, the other tower, ...) is kept.
  The loaded part must match the sub-tree it replaces key for key and shape for
  shape; values are cast to the dtypes of the replaced leaves.

  Args:
    params: a (larger) model's tree, e.g. `variables['params']`.
    loaded: the tree to insert, e.g. `load_pretrained(...)[1]['params']`.
    path: '/'-joined (or tuple) path of the sub-tree in `params`; '' = the root.

  Returns:
    A new tree; `params` is not modified.

  Raises:
    ValueError: if `path` does not exist or the trees differ (first keys named).
  """
  path = _as_path(path)
  node = params
  for depth, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
      raise ValueError(f"merge_params: no {key!r} at {fmt(path[:depth]) or '<root>'}; "
                       f"it holds {have}")
    node = node[key]
  target, source = flatten(node), flatten(loaded)
  shape = lambda x: tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
  missing = [f"{fmt(p)} {shape(target[p])}" for p in target if p not in source]
  unexpected = [f"{fmt(p)} {shape(source[p])}" for p in source if p not in target]
  mismatched = [f"{fmt(p)}: loaded {shape(source[p])}, model {shape(target[p])}"
                for p in source if p in target and shape(source[p]) != shape(target[p])]
  if missing or unexpected or mismatched:
    raise ValueError(mismatch_report(
        f"merge_params: loaded tree does not fit {fmt(path) or '<root>'}:",
        missing, unexpected, mismatched))
  merged = unflatten({p: np.asarray(source[p], dtype=target[p].dtype) for p in target})
  return _replace(params, path, merged)


def _replace(tree: Mapping, path: Path, value) -> Any:
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _replace(tree[path[0]], path[1:], value)
  return out


def merge_variables(variables: Mapping, loaded: Mapping,
                    path: Union[str, Sequence[str]] = ()) -> dict:
  """`merge_params` for every collection of `loaded` ('params', 'batch_stats')."""
  out = dict(variables)
  for collection, tree in loaded.items():
    if collection not in variables:
      raise ValueError(f"merge_variables: the model has no {collection!r} collection; it has "
                       f"{sorted(variables)}")
    out[collection] = merge_params(variables[collection], tree, path)
  return out
