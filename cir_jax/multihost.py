"""Joining a multi-process run: `initialize(config)` before any JAX computation.

One process per host (or, for tests, several on 127.0.0.1) runs the same
program; `jax.distributed.initialize` connects them so that `jax.devices()`
lists every device of every process and one jitted step spans them all.

Where the three connection parameters come from, first match wins:
  1. the config: `--config.distributed_coordinator=host:port
     --config.num_processes=N --config.process_id=i`;
  2. environment variables: JAX_COORDINATOR_ADDRESS (read by JAX itself),
     JAX_NUM_PROCESSES, JAX_PROCESS_ID (read here);
  3. JAX's cluster auto-detection (TPU pods, SLURM, Open MPI, Kubernetes).
CPU processes talk through gloo collectives (set before initialising, since
the CPU client is created with the collectives it will use).

Two processes with 4 CPU devices each on one machine (what tests/test_multihost.py
does; run the same command with process_id=1 in a second shell):

  XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m cir_jax.train \
      --config configs/tirg_css.py:cpu --workdir runs/mh --config.distributed=True \
      --config.distributed_coordinator=127.0.0.1:12345 --config.num_processes=2 \
      --config.process_id=0
"""
import os
from typing import Optional

import jax
import ml_collections


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name, "")
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def connection_args(config: ml_collections.ConfigDict) -> dict:
  """Keyword arguments for `jax.distributed.initialize` (None = let JAX decide).

  Args:
    config: the trainer config; reads `distributed_coordinator` ('' = auto),
      `num_processes` (0 = auto) and `process_id` (-1 = auto).

  Returns:
    {'coordinator_address', 'num_processes', 'process_id'}, each possibly None.
  """
  coordinator = config.distributed_coordinator or None  # JAX reads JAX_COORDINATOR_ADDRESS
  num_processes = config.num_processes or _env_int("JAX_NUM_PROCESSES")
  process_id = config.process_id if config.process_id >= 0 else _env_int("JAX_PROCESS_ID")
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"config.num_processes={num_processes} must be >= 1 (0 = auto)")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"config.process_id={process_id} must be in [0, num_processes="
                     f"{num_processes})")
  if coordinator is not None and ":" not in coordinator:
    raise ValueError(f"config.distributed_coordinator={coordinator!r} must be 'host:port'")
  return {"coordinator_address": coordinator, "num_processes": num_processes,
          "process_id": process_id}


def initialize(config: ml_collections.ConfigDict) -> bool:
  """Calls `jax.distributed.initialize` if `config.distributed` (once per process).

  Must run before anything touches a JAX backend (device lists, arrays, jit):
  JAX refuses to join a cluster after its backends exist.

  Returns:
    True if this process is (now) part of a distributed run.
  """
  if not config.distributed:
    return False
  if jax.distributed.is_initialized():  # e.g. train, then evaluate in one process
    return True
  # The CPU client needs cross-process collectives; other backends ignore this.
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**connection_args(config))
  return True
