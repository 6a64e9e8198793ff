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

Corruption. A step directory with every file present can still fail to restore
(a truncated array file, a cut `_METADATA`, an empty `manifest.ocdbt`). Resuming
then tries the next older step; the ones that failed are moved aside
(`<step>.corrupt-<time>`) with a one-line message naming the bad file, and the
run resumes from the newest step that restores. If none restores nothing is
moved and the error lists them all (training from scratch over a workdir of
unreadable checkpoints would hide the problem).

Rotation. Besides the newest `keep_checkpoints`, the manager keeps the saved
step with the lowest recent training loss (`LOSS_METRIC`, the median over the
divergence monitor's window, see cir_jax/divergence.py), so a run that degrades
slowly, below the divergence thresholds, cannot rotate away the last good one.
"""
import json
import pathlib
import re
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

CHECKPOINTS = "checkpoints"
ITEM = "default"  # the item name Orbax gives a single-item checkpoint
TMP_MARKER = ".orbax-checkpoint-tmp"
# Files without which a step directory cannot be restored.
REQUIRED_FILES = ("_CHECKPOINT_METADATA", f"{ITEM}/_METADATA")
_MAX_LISTED = 3  # differing keys named in a mismatch error
# The checkpoint metric of the "best" checkpoint kept besides the newest ones (lower is better).
LOSS_METRIC = "train_loss_median"
# TensorStore names the file it failed on as `local file "<path>"`, outermost first.
_TENSORSTORE_FILE = re.compile(r'local file "([^"]+)"(?::\s*)?')


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
  preserve = ocp.checkpoint_managers.AnyPreservationPolicy([
      ocp.checkpoint_managers.LatestN(n=keep),
      # reverse=True sorts by descending loss, and BestN keeps the last n: the lowest.
      ocp.checkpoint_managers.BestN(get_metric_fn=_loss_metric, reverse=True, n=1,
                                    keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=True,
                                         preservation_policy=preserve)
  return ocp.CheckpointManager(directory, options=options)


def _loss_metric(metrics) -> float:
  """The rotation's quality of a checkpoint: its recent training loss (inf if unknown)."""
  value = (metrics or {}).get(LOSS_METRIC)
  return float(value) if value is not None else float("inf")


def save(manager: ocp.CheckpointManager, step: int, state, metrics: Optional[dict] = None):
  """Starts an async save of `state` as `step` (the caller checks finiteness first).

  `metrics` ({LOSS_METRIC: float}) ranks the checkpoint for the "best" one kept
  by rotation; a checkpoint without it is only kept while among the newest.
  """
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


def _saved_shapes(step_dir: pathlib.Path) -> dict[str, tuple]:
  saved = ocp.StandardCheckpointHandler().metadata(step_dir / ITEM)
  return _flat_shapes(getattr(saved, "tree", saved))


def _mismatch_error(step_dir, differences) -> ValueError:
  return ValueError(
      f"checkpoint {step_dir} does not match the model of this config:\n  "
      + "\n  ".join(differences)
      + "\n(was it trained with another config? use that config, or a fresh --workdir)")


def check_matches(step_dir, state):
  """Raises ValueError naming the first differing keys/shapes of `step_dir` vs `state`.

  Compares Orbax's saved tree metadata with `state` before any array is read,
  so the error names parameters instead of Orbax's generic tree-structure error.
  """
  step_dir = pathlib.Path(step_dir)
  differences = tree_differences(_saved_shapes(step_dir), _flat_shapes(state))
  if differences:
    raise _mismatch_error(step_dir, differences)


def bad_file(step_dir, error: BaseException) -> tuple[str, str]:
  """(file, reason): the file of `step_dir` that made restoring it fail, in one line.

  TensorStore names the innermost file it could not read; a JSON error names
  none, so the step's JSON files are parsed one by one; else the step dir itself.
  """
  step_dir = pathlib.Path(step_dir)
  text = str(error)
  matches = list(_TENSORSTORE_FILE.finditer(text))
  if matches:
    reason = text[matches[-1].end():].split(" [tensorstore_spec")[0]
    return matches[-1].group(1), reason.strip().splitlines()[0][:200] if reason.strip() else ""
  for path in sorted(step_dir.rglob("*")):
    if path.is_file() and (path.name.startswith("_") or path.parent.name == "array_metadatas"):
      try:
        json.loads(path.read_bytes())
      except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        return str(path), f"not valid JSON ({e})"
  first = text.strip().splitlines()[0][:200] if text.strip() else ""
  return str(step_dir), f"{type(error).__name__}: {first}"


def _restore_step(manager, step, state) -> tuple[Any, Optional[BaseException]]:
  """(restored state, None) or (None, the error) for one step; a model mismatch raises."""
  step_dir = pathlib.Path(manager.directory) / str(step)
  try:
    saved = _saved_shapes(step_dir)
  except Exception as e:  # pylint: disable=broad-except
    return None, e
  differences = tree_differences(saved, _flat_shapes(state))
  if differences:  # a readable checkpoint of another model: the user's mistake, never moved
    raise _mismatch_error(step_dir, differences)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(_abstract(state))), None
  except Exception as e:  # pylint: disable=broad-except
    return None, e


def _agreed(ok: bool) -> bool:
  """True iff the step restored on every process (they must resume from the same one)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.int32(ok)).all())


def latest_complete_step(manager: ocp.CheckpointManager, log=print) -> Optional[int]:
  """The newest step whose directory holds a whole checkpoint (warns about skipped ones)."""
  steps = complete_steps(manager, log)
  return steps[0] if steps else None


def complete_steps(manager: ocp.CheckpointManager, log=print) -> list[int]:
  """Steps whose directory holds every REQUIRED_FILES entry, newest first."""
  steps = []
  for step in sorted(manager.all_steps(), reverse=True):
    missing = _missing_files(pathlib.Path(manager.directory) / str(step))
    if missing:
      log(f"warning: skipping incomplete checkpoint {manager.directory}/{step} "
          f"(missing {', '.join(missing)})")
    else:
      steps.append(step)
  return steps


def restore_latest(manager: ocp.CheckpointManager, state, log=print, move_aside: bool = True
                   ) -> tuple[Any, Optional[int]]:
  """Restores the newest checkpoint that restores onto `state`'s shapes and shardings.

  Steps that fail to restore (corrupt files) are skipped with a one-line warning
  naming the bad file and, with `move_aside`, renamed `<step>.corrupt-<time>` once
  an older step has restored (see the module docstring).

  Returns:
    (state, step), or (state, None) when there is no checkpoint.

  Raises:
    ValueError naming the differing keys if a checkpoint is of another model.
    RuntimeError naming every bad file if checkpoints exist but none restores.
  """
  failed = []
  for step in complete_steps(manager, log):
    restored, error = _restore_step(manager, step, state)
    if _agreed(error is None):
      _set_aside(manager, failed, step, log, move_aside)
      return restored, step
    step_dir = pathlib.Path(manager.directory) / str(step)
    path, reason = bad_file(step_dir, error) if error is not None else (str(step_dir), "")
    where = f"bad file {path}" + (f": {reason}" if reason else "")
    log(f"warning: checkpoint {step_dir} does not restore ({where}); trying an older one")
    failed.append((step_dir, where))
  if failed:
    listed = "\n  ".join(f"{d}: {w}" for d, w in failed)
    raise RuntimeError(f"no checkpoint in {manager.directory} restores:\n  {listed}\n"
                       f"move the bad ones away (or use a fresh --workdir) to start over")
  return state, None


def _set_aside(manager, failed, step, log, move_aside):
  """Renames the step dirs of `failed` `<step>.corrupt-<time>` (process 0), then reloads."""
  if not failed:
    return
  if not move_aside:
    log(f"resuming from step {step}, the newest of {manager.directory} that restores")
    return
  if jax.process_index() == 0:
    for step_dir, where in failed:
      aside = step_dir.with_name(f"{step_dir.name}.corrupt-{int(time.time())}")
      step_dir.rename(aside)
      log(f"moved the corrupt checkpoint {step_dir} aside to {aside.name}; resuming from "
          f"step {step}")
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("cir_jax.checkpoint.set_aside")
  manager.reload()  # forget the moved steps: they may be saved again


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
    return restore_latest(manager, state, log, move_aside=False)
