"""Orbax checkpoints of the train state, and the resume order of DESIGN.md.

Resume order: (1) the latest checkpoint in the workdir, (2) `config.resume`
(another workdir or checkpoint directory), (3) `config.init_from` (pretrained
weights, handled by the caller), (4) scratch.
"""
import pathlib
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def make_manager(workdir, keep: int) -> ocp.CheckpointManager:
  """An async CheckpointManager under `<workdir>/checkpoints` keeping the latest `keep`."""
  directory = pathlib.Path(workdir).absolute() / "checkpoints"
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, step: int, state, metrics: Optional[dict] = None):
  manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics)


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def restore_latest(manager: ocp.CheckpointManager, state) -> tuple[Any, Optional[int]]:
  """Restores the newest checkpoint onto `state`'s shapes and shardings.

  Returns (state, step) or (state, None) when there is no checkpoint.
  """
  step = manager.latest_step()
  if step is None:
    return state, None
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(_abstract(state)))
  except ValueError as e:
    raise ValueError(f"checkpoint {manager.directory}/{step} does not match the model of this "
                     f"config: {e}") from e
  return restored, step


def restore_from_directory(directory, state) -> tuple[Any, Optional[int]]:
  """Restores the newest checkpoint of another workdir (or its checkpoints/ folder)."""
  path = pathlib.Path(directory).absolute()
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if not path.is_dir():
    raise FileNotFoundError(f"config.resume={directory!r}: no such checkpoint directory")
  with ocp.CheckpointManager(path) as manager:
    if manager.latest_step() is None:
      raise FileNotFoundError(f"config.resume={directory!r}: no checkpoint found in {path}")
    return restore_latest(manager, state)
