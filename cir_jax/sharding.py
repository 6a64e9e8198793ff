"""One data-parallel mesh and the shardings the trainer and evaluator use.

The mesh has a single axis 'data' over every device of every process, ordered
by process so that process p holds the p-th contiguous slice of each global
batch (which is what the input pipeline feeds it).
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None, axis_name: str = DATA_AXIS) -> Mesh:
  """A 1-D mesh over `devices` (default: all), axis `axis_name` ('data')."""
  devices = devices if devices is not None else jax.devices()
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), (axis_name,))


def single_device_mesh(axis_name: str = DATA_AXIS) -> Mesh:
  """A mesh over the first device only (one-device evaluation, tests)."""
  return make_mesh(jax.devices()[:1], axis_name)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_replicated(tree, mesh: Mesh):
  """The same host arrays (a pytree; NumPy or memory-mapped) on every device of `mesh`.

  Each process passes its own copy; a device's slice is read from the host array
  only when that device is filled.
  """
  spec = replicated(mesh)
  return jax.tree.map(lambda a: jax.make_array_from_callback(
      np.shape(a), spec, lambda index: np.asarray(a[index])), tree)


def local_batch_size(global_batch: int, mesh: Mesh, what: str = "batch_size") -> int:
  """This process's share of a global batch; raises if it does not divide evenly."""
  devices, processes = mesh.size, jax.process_count()
  if global_batch <= 0 or global_batch % devices:
    raise ValueError(f"{what}={global_batch} must be a positive multiple of the number of "
                     f"devices ({devices} devices over {processes} process(es))")
  return global_batch // processes


def to_global(local: dict, mesh: Mesh) -> dict:
  """Process-local numpy arrays (leading axis = local batch) -> global sharded jax.Arrays."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
