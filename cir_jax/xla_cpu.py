"""XLA:CPU compiler options for jitted training steps.

jax 0.10's XLA:CPU hands native convolutions to YNNPACK by default (the
default `xla_cpu_experimental_ynn_fusion_type` is dots, convolutions and
reductions). Its forward convolutions are as fast as Eigen's or faster, but
its weight gradients are slow (the 7x7 stem at 224 px: 292 vs 159 ms; 56x56x64
3x3: 146 vs 116 ms, one core, batch 32) and run on one thread, so a training
step is faster with convolutions left to Eigen and dots and reductions kept in
YNNPACK: the TIRG ResNet-18 step, batch 32, 2 cores, alternated, 2026-12-04:
5.28 / 5.22 -> 6.21 / 6.07 examples/s at 224 px and 65.3 / 66.1 -> 69.2 / 69.6
at 64 px (docs/benchmarks.md; tools/benchmark_conv_layers.py has the per-layer
table). The options are per compiled program (`jax.jit(compiler_options=)`):
evaluation, whose forward-only convolutions YNNPACK runs well, keeps the
defaults, and nothing else in the process changes. Off CPU they are empty.
"""
import functools
import logging

import jax

# Dots and reductions in YNNPACK, convolutions in Eigen.
TRAIN_CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}


def train_compiler_options() -> dict:
  """`compiler_options` for a training step's `jax.jit` on the default backend.

  TRAIN_CPU_OPTIONS on CPU if this XLA accepts them (checked once by compiling a
  scalar function; another jaxlib may have renamed the option: then a warning
  and XLA's defaults), {} on other backends.
  """
  if jax.default_backend() != "cpu":
    return {}
  return dict(TRAIN_CPU_OPTIONS) if _accepted() else {}


@functools.lru_cache(maxsize=None)
def _accepted() -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options=TRAIN_CPU_OPTIONS).lower(1.0).compile()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("XLA:CPU did not accept %s (%s); training steps compile with XLA's "
                    "defaults", TRAIN_CPU_OPTIONS, str(e).splitlines()[0])
    return False
  return True
