"""XLA flags of the test session and of the subprocesses (trainer, multi-host children,
device check) that the tests start.

The suite compiles a few hundred tiny programs and runs each for a few steps, so
LLVM's optimisation passes cost more time than they save: backend optimisation
level 0 cuts the suite's compile time by about a quarter. XLA's own HLO passes
(fusion, SPMD partitioning, layout) are unchanged, and every number is still
checked against NumPy / torch references or a second run under the same flags.
Training and benchmarks outside the suite use XLA's default level.
"""
TEST_ONLY = "--xla_backend_optimization_level=0"


def for_devices(num_devices: int) -> str:
  """XLA_FLAGS for a process with `num_devices` fake CPU devices."""
  return f"--xla_force_host_platform_device_count={num_devices} {TEST_ONLY}"
