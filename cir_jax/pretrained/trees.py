"""Checkpoint trees keyed by path tuples, and the error report when two trees differ."""
from typing import Any, Mapping

Path = tuple[str, ...]
MAX_LISTED = 5  # keys named per category in an error message


def flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def unflatten(flat: Mapping[Path, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def fmt(path: Path) -> str:
  return "/".join(path)


def mismatch_report(where: str, missing, unexpected, mismatched) -> str:
  """missing/unexpected: lists of strings; mismatched: list of strings."""
  lines = [where]
  for title, items in (("missing (in the model, not in the checkpoint)", missing),
                       ("unexpected (in the checkpoint, not in the model)", unexpected),
                       ("shape mismatches", mismatched)):
    if items:
      shown = "; ".join(items[:MAX_LISTED])
      more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
      lines.append(f"  {len(items)} {title}, first: {shown}{more}")
  return "\n".join(lines)
