"""Orbax checkpoints of the train state, and the resume order of DESIGN.md.

Resume order: (1) the latest checkpoint in the workdir, (2) `config.resume`
(another workdir or checkpoint directory), (3) `config.init_from` (pretrained
weights, handled by the caller), (4) scratch.

Crash safety. Orbax 0.12.8 writes each step into
`<step>.orbax-checkpoint-tmp-<n>/` and renames it to `<step>/` once every file
(`_CHECKPOINT_METADATA`, `default/_METADATA`, the arrays, `commit_success.txt`)
is written, so a `kill -9` at any moment leaves either a finished step or a tmp
directory. Orbax already ignores tmp directories when listing steps (their names
do not parse as steps) but keeps them on disk and says nothing; it does *not*
check that a directory named like a step holds a whole checkpoint (a copy cut
short, a non-atomic filesystem). Here both are reported, and an incomplete step
directory is moved aside (`<step>.incomplete-<time>`) so that it is never loaded
and the step can be saved again.
"""
import pathlib
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

CHECKPOINTS = "checkpoints"
ITEM = "default"  # the item name Orbax gives a single-item checkpoint
TMP_MARKER = ".orbax-checkpoint-tmp"
# Files without which a step directory cannot be restored.
REQUIRED_FILES = ("_CHECKPOINT_METADATA", f"{ITEM}/_METADATA")
_MAX_LISTED = 3  # differing keys named in a mismatch error


def _missing_files(step_dir: pathlib.Path) -> list[str]:
  return [name for name in REQUIRED_FILES if not (step_dir / name).exists()]


def scan(directory, log=print) -> list[pathlib.Path]:
  """Warns about unfinished checkpoints in `directory`; returns incomplete step dirs.

  Args:
    directory: a `checkpoints/` folder.
    log: where warnings go.

  Returns:
    Directories named like a step (digits) that lack one of `REQUIRED_FILES`.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return []
  incomplete = []
  for path in sorted(directory.iterdir()):
    if TMP_MARKER in path.name:
      log(f"warning: ignoring unfinished checkpoint {path} (an interrupted save; Orbax never "
          f"loads it, delete it to reclaim space)")
    elif path.is_dir() and path.name.isdigit() and _missing_files(path):
      log(f"warning: ignoring incomplete checkpoint {path}: missing "
          f"{', '.join(_missing_files(path))}")
      incomplete.append(path)
  return incomplete


def make_manager(workdir, keep: int, log=print) -> ocp.CheckpointManager:
  """An async CheckpointManager under `<workdir>/checkpoints` keeping the latest `keep`.

  Incomplete step directories are first renamed `<step>.incomplete-<unix time>`
  (by process 0, then all processes wait), so neither this manager nor a later
  save of the same step can trip over them.
  """
  directory = pathlib.Path(workdir).absolute() / CHECKPOINTS
  incomplete = scan(directory, log)
  if incomplete and jax.process_index() == 0:
    for path in incomplete:
      aside = path.with_name(f"{path.name}.incomplete-{int(time.time())}")
      path.rename(aside)
      log(f"moved {path} aside to {aside}")
  if incomplete and jax.process_count() > 1:
    multihost_utils.sync_global_devices("cir_jax.checkpoint.make_manager")
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, metrics: Optional[dict] = None):
  """Starts an async save of `state` as `step` (the caller checks finiteness first)."""
  manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics)


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_shapes(tree) -> dict[str, tuple]:
  """{'params/composer/fc/kernel': shape} for a state or an Orbax metadata tree.

  A TrainState (attributes, tuples) and Orbax's saved tree (nested dicts and
  lists) flatten to the same names, so the two can be compared key by key.
  """
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ()) or ())
          for path, leaf in leaves}


def tree_differences(saved: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
  """Human-readable differences between two {key: shape} maps (empty if they match)."""
  lines = []

  def listed(keys, table):
    shown = ", ".join(f"{k} {list(table[k])}" for k in keys[:_MAX_LISTED])
    more = f" (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else ""
    return shown + more

  missing = sorted(set(expected) - set(saved))
  extra = sorted(set(saved) - set(expected))
  shapes = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
  if missing:
    lines.append(f"missing from the checkpoint: {listed(missing, expected)}")
  if extra:
    lines.append(f"in the checkpoint but not in this model: {listed(extra, saved)}")
  if shapes:
    shown = ", ".join(f"{k} checkpoint {list(saved[k])} vs model {list(expected[k])}"
                      for k in shapes[:_MAX_LISTED])
    more = f" (+{len(shapes) - _MAX_LISTED} more)" if len(shapes) > _MAX_LISTED else ""
    lines.append(f"shapes differ: {shown}{more}")
  return lines


def check_matches(step_dir, state):
  """Raises ValueError naming the first differing keys/shapes of `step_dir` vs `state`.

  Compares Orbax's saved tree metadata with `state` before any array is read,
  so the error names parameters instead of Orbax's generic tree-structure error.
  """
  step_dir = pathlib.Path(step_dir)
  saved = ocp.StandardCheckpointHandler().metadata(step_dir / ITEM)
  differences = tree_differences(_flat_shapes(getattr(saved, "tree", saved)),
                                 _flat_shapes(state))
  if differences:
    raise ValueError(
        f"checkpoint {step_dir} does not match the model of this config:\n  "
        + "\n  ".join(differences)
        + "\n(was it trained with another config? use that config, or a fresh --workdir)")


def latest_complete_step(manager: ocp.CheckpointManager, log=print) -> Optional[int]:
  """The newest step whose directory holds a whole checkpoint (warns about skipped ones)."""
  for step in sorted(manager.all_steps(), reverse=True):
    missing = _missing_files(pathlib.Path(manager.directory) / str(step))
    if not missing:
      return step
    log(f"warning: skipping incomplete checkpoint {manager.directory}/{step} "
        f"(missing {', '.join(missing)})")
  return None


def restore_latest(manager: ocp.CheckpointManager, state, log=print
                   ) -> tuple[Any, Optional[int]]:
  """Restores the newest complete checkpoint onto `state`'s shapes and shardings.

  Returns (state, step) or (state, None) when there is no checkpoint. Raises
  ValueError naming the differing keys if the checkpoint is of another model.
  """
  step = latest_complete_step(manager, log)
  if step is None:
    return state, None
  check_matches(pathlib.Path(manager.directory) / str(step), state)
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(_abstract(state)))
  except ValueError as e:
    raise ValueError(f"checkpoint {manager.directory}/{step} does not match the model of this "
                     f"config: {e}") from e
  return restored, step


def restore_from_directory(directory, state, log=print) -> tuple[Any, Optional[int]]:
  """Restores the newest checkpoint of another workdir (or its checkpoints/ folder)."""
  path = pathlib.Path(directory).absolute()
  if (path / CHECKPOINTS).is_dir():
    path = path / CHECKPOINTS
  if not path.is_dir():
    raise FileNotFoundError(f"config.resume={directory!r}: no such checkpoint directory")
  scan(path, log)  # read-only here: warn, never move another run's files
  with ocp.CheckpointManager(path) as manager:
    if latest_complete_step(manager, log) is None:
      raise FileNotFoundError(f"config.resume={directory!r}: no checkpoint found in {path}")
    return restore_latest(manager, state, log)
