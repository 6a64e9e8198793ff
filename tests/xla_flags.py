"""XLA flags of the test session and of the subprocesses (trainer, multi-host children,
device check) that the tests start.

The suite compiles a few hundred tiny programs and runs each for a few steps, so
compile time dominates. Two flags cut it:
* backend optimisation level 0: LLVM's optimisation passes cost more time than
  they save (about a quarter of the suite's compile time);
* `xla_cpu_use_fusion_emitters=false`: XLA:CPU emits fusions with its classic
  elemental IR emitter instead of the MLIR fusion emitters, which compile a
  tiny SSN train step in ~4 s instead of ~11 s (init 2.4 s instead of 4.4 s).
Both change how XLA:CPU generates code, not what the program computes; XLA's
HLO passes (fusion decisions, SPMD partitioning, layout) are unchanged, and every
number is still checked against NumPy / torch references or a second run under
the same flags. Training and benchmarks outside the suite use XLA's defaults.
"""
TEST_ONLY = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def for_devices(num_devices: int) -> str:
  """XLA_FLAGS for a process with `num_devices` fake CPU devices."""
  return f"--xla_force_host_platform_device_count={num_devices} {TEST_ONLY}"
