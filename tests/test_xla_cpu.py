"""xla_cpu: training steps compile their convolutions out of YNNPACK, with the same numbers."""
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np

from cir_jax import experiment
from cir_jax import train
from cir_jax import xla_cpu
from cir_jax.data import pipeline
from tests import fakes


def _library_ops(hlo: str) -> dict:
  """{'ynn': ops inside YNNPACK fusions, 'outside': convolutions/dots outside them}."""
  bodies = {m.group(1): m.group(2) for m in re.finditer(
      r"^%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo, re.S | re.M)}
  ynn = set()
  for m in re.finditer(r"%ynn_fusion[\w.]* = [^\n]*calls=%?([\w.\-]+)", hlo):
    ynn |= set(re.findall(r"= \S+ (convolution|dot)\(", bodies[m.group(1)]))
  entry = hlo[hlo.index("ENTRY"):]
  outside = set(re.findall(r"= \S+ (convolution|dot)\(", entry))
  return {"ynn": ynn, "outside": outside}


def _conv_then_dot(x, k):
  y = jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.sum(jnp.tanh(y.reshape(-1, k.shape[-1]) @ k[0, 0]))


def test_options_move_convolutions_to_eigen_keep_dots_in_ynnpack_and_the_numbers():
  assert jax.default_backend() == "cpu"
  options = xla_cpu.train_compiler_options()
  assert options == xla_cpu.TRAIN_CPU_OPTIONS
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 32))
  k = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, 32, 32))
  grad = jax.value_and_grad(_conv_then_dot, argnums=(0, 1))
  default = jax.jit(grad).lower(x, k).compile()
  moved = jax.jit(grad, compiler_options=options).lower(x, k).compile()
  assert "convolution" in _library_ops(default.as_text())["ynn"]
  ops = _library_ops(moved.as_text())
  assert "convolution" not in ops["ynn"] and "convolution" in ops["outside"]
  assert "dot" in ops["ynn"]
  # Another library sums in another order: float32 rounding relative to each array's scale.
  for a, b in zip(jax.tree.leaves(moved(x, k)), jax.tree.leaves(default(x, k))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))


def test_the_trainers_step_is_compiled_with_them():
  config = fakes.tiny_config("tirg_lastconv", **{"model.conv_impl": "xla"})
  split = fakes.random_split(num_queries=8)
  mesh = experiment.make_mesh(config, jax.devices()[:1])
  vocab = fakes.make_vocab(config, split)
  data = pipeline.TrainPipeline(split, vocab, config.data.max_text_len, config.batch_size, mesh,
                                config.seed, config.data.image_size)
  exp = experiment.build(config, mesh, vocab)
  step = train.make_train_step(exp.model, exp.tx, config.loss, mesh)
  ops = _library_ops(step.lower(exp.state, next(data.batches(0))).compile().as_text())
  assert "convolution" in ops["outside"] and "convolution" not in ops["ynn"]


def test_an_option_this_xla_rejects_warns_and_falls_back(monkeypatch, caplog):
  monkeypatch.setattr(xla_cpu, "TRAIN_CPU_OPTIONS",
                      {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_NO_SUCH"})
  xla_cpu._accepted.cache_clear()
  try:
    with caplog.at_level(logging.WARNING):
      assert xla_cpu.train_compiler_options() == {}
    assert "did not accept" in caplog.text and "LIBRARY_FUSION_TYPE_NO_SUCH" in caplog.text
  finally:
    xla_cpu._accepted.cache_clear()


def test_no_options_off_cpu(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert xla_cpu.train_compiler_options() == {}
