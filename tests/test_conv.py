"""The im2col-matmul convolution equals XLA's native convolution, forward and backward."""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cir_jax.models import conv
from cir_jax.models import hf_resnet


@pytest.mark.parametrize("kernel,strides,padding", [
    ((3, 3), (1, 1), ((1, 1), (1, 1))), ((3, 3), (2, 2), ((1, 1), (1, 1))),
    ((7, 7), (2, 2), ((3, 3), (3, 3))), ((1, 1), (2, 2), ((0, 0), (0, 0))),
    ((3, 3), (1, 1), "SAME"), ((2, 3), (1, 2), "VALID"),
])
def test_matmul_lowering_equals_native(kernel, strides, padding):
  x = jax.random.normal(jax.random.key(0), (2, 13, 11, 5))
  layers = {impl: conv.Conv(4, kernel, strides, padding, conv_impl=impl) for impl in ("xla", "matmul")}
  params = layers["xla"].init(jax.random.key(1), x)

  def out_and_grad(impl):
    f = lambda p, x: jnp.sum(jnp.sin(layers[impl].apply(p, x)))
    return layers[impl].apply(params, x), jax.grad(f, argnums=(0, 1))(params, x)

  (y_ref, g_ref), (y, g) = out_and_grad("xla"), out_and_grad("matmul")
  np.testing.assert_allclose(y, y_ref, atol=2e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=5e-5)


def test_resnet_params_are_shared_between_lowerings():
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  native = hf_resnet.ResNetBasicTiny(conv_impl="xla")
  matmul = hf_resnet.ResNetBasicTiny(conv_impl="matmul")
  variables = native.init(jax.random.key(1), x)
  assert jax.tree.structure(variables) == jax.tree.structure(matmul.init(jax.random.key(1), x))
  np.testing.assert_allclose(matmul.apply(variables, x)[0], native.apply(variables, x)[0],
                             atol=1e-4)


def test_auto_and_unknown_impl():
  on_cpu = jax.default_backend() == "cpu"
  assert conv.resolve_conv_impl("auto") == ("mixed" if on_cpu else "xla")
  assert conv.resolve_conv_impl("auto", 64 * 64) == ("mixed" if on_cpu else "xla")
  assert conv.resolve_conv_impl("auto", 128 * 128) == ("mixed" if on_cpu else "xla")
  assert conv.resolve_conv_impl("auto", 224 * 224) == "xla"
  assert conv.resolve_conv_impl("matmul", 224 * 224) == "matmul"
  with pytest.raises(ValueError, match="unknown conv_impl 'fft'; valid: \\['auto', 'xla', 'matmul', 'mixed'\\]"):
    conv.resolve_conv_impl("fft")


@pytest.mark.parametrize("window,strides,padding,shape", [
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (2, 9, 10, 3)),   # ResNet's stem pool, odd/even sizes
    ((3, 3), (2, 2), ((1, 1), (1, 1)), (2, 8, 8, 3)),
    ((2, 3), (1, 2), ((0, 1), (1, 0)), (1, 7, 6, 2)),
])
def test_max_pool_slices_equal_nn_max_pool_with_ties(window, strides, padding, shape):
  # Small integers after a ReLU: many windows hold several equal maxima (and all-zero
  # windows); the gradient must go to the first maximum, as select-and-scatter does.
  # On this CPU backend conv.max_pool takes the slice lowering for every conv_impl.
  x = jnp.maximum(jax.random.randint(jax.random.key(0), shape, -2, 3).astype(jnp.float32), 0)

  def reference(x):
    return nn.max_pool(x, window, strides=strides, padding=padding)

  w = jax.random.normal(jax.random.key(1), jax.eval_shape(reference, x).shape)
  expected_grad = jax.grad(lambda x: jnp.sum(w * reference(x)))(x)
  for impl in ("matmul", "xla"):
    np.testing.assert_array_equal(conv.max_pool(x, window, strides, padding, impl), reference(x))
    grad = jax.grad(lambda x: jnp.sum(w * conv.max_pool(x, window, strides, padding, impl)))(x)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-6)
  # The slice lowering really is the one that ran: no reduce_window / select-and-scatter.
  jaxpr = str(jax.make_jaxpr(jax.grad(
      lambda x: jnp.sum(w * conv.max_pool(x, window, strides, padding, "xla"))))(x))
  assert "reduce_window" not in jaxpr and "select_and" not in jaxpr, jaxpr


def test_max_pool_keeps_nn_max_pool_for_native_convs_off_cpu(monkeypatch):
  x = jnp.ones((1, 8, 8, 2))
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  pool = lambda impl: str(jax.make_jaxpr(
      lambda x: conv.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), impl))(x))
  assert "reduce_window_max" in pool("xla")
  assert "reduce_window_max" not in pool("mixed")


def test_mixed_picks_per_layer_and_equals_native():
  pad = ((1, 1), (1, 1))
  assert conv.layer_impl("mixed", (16, 16), (3, 3), (1, 1), pad) == "xla"      # 16x16 out
  assert conv.layer_impl("mixed", (16, 16), (3, 3), (2, 2), pad) == "xla"      # 8x8 out
  assert conv.layer_impl("mixed", (8, 8), (3, 3), (2, 2), pad) == "xla"        # 4x4 out
  assert conv.layer_impl("mixed", (4, 4), (3, 3), (2, 2), pad) == "matmul"     # 2x2 out
  assert conv.layer_impl("mixed", (2, 2), (3, 3), (1, 1), pad) == "matmul"     # 2x2 out
  assert conv.layer_impl("mixed", (64, 64), (7, 7), (2, 2), ((3, 3), (3, 3))) == "xla"   # stem
  assert conv.layer_impl("mixed", (16, 16), (1, 1), (2, 2), "VALID") == "matmul"
  assert conv.layer_impl("matmul", (64, 64), (3, 3), (1, 1), pad) == "matmul"
  # ResNetTiny at 16 px: the stem and stage 0 (4x4 maps) native, stage 1 (2x2) as matmuls.
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  native = hf_resnet.ResNetBasicTiny(conv_impl="xla")
  mixed = hf_resnet.ResNetBasicTiny(conv_impl="mixed")
  variables = native.init(jax.random.key(1), x)

  def loss(params, model):
    (_, out), _ = model.apply({**variables, "params": params}, x, train=True,
                              mutable=["batch_stats"])
    return jnp.sum(jnp.sin(out["feature_map"]))

  np.testing.assert_allclose(loss(variables["params"], mixed), loss(variables["params"], native),
                             rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.grad(loss)(variables["params"], mixed)),
                  jax.tree.leaves(jax.grad(loss)(variables["params"], native))):
    np.testing.assert_allclose(a, b, atol=1e-4)


def _conv_ops(config, image_size):
  """Native convolutions in the traced query + target computation of config's model."""
  from cir_jax.models import build  # pylint: disable=g-import-not-at-top
  model = build.build_model(config.model, 20, image_size)
  b, length = 2, 4
  batch = {"ref_image": jax.ShapeDtypeStruct((b, image_size, image_size, 3), jnp.uint8),
           "target_image": jax.ShapeDtypeStruct((b, image_size, image_size, 3), jnp.uint8),
           "text_ids": jax.ShapeDtypeStruct((b, length), jnp.int32),
           "text_mask": jax.ShapeDtypeStruct((b, length), jnp.bool_)}
  variables = jax.eval_shape(model.init, jax.random.key(0), batch)
  jaxpr = jax.make_jaxpr(model.apply)(variables, batch)
  return model, _count(jaxpr.jaxpr, "conv_general_dilated")


def _count(jaxpr, primitive):
  """Equations of `primitive` in a jaxpr, sub-jaxprs (pjit, remat, ...) included."""
  total = 0
  for eqn in jaxpr.eqns:
    total += eqn.primitive.name == primitive
    for sub in jax.core.jaxprs_in_params(eqn.params):
      total += _count(sub, primitive)
  return total


# resnet_tiny: stem + 2 + (2 + the shortcut of the second block), run on reference and target
# images; TIRGLastConv: 2 branches x 2.
CONVS = 2 * 6 + 4


@pytest.mark.parametrize("conv_impl,image_size", [("xla", 32), ("matmul", 224), ("auto", 224),
                                                  ("auto", 32)])
def test_model_conv_impl_reaches_every_convolution(conv_impl, image_size):
  from tests import fakes  # pylint: disable=g-import-not-at-top
  config = fakes.tiny_config("tirg_lastconv")
  config.model.conv_impl = conv_impl
  model, native = _conv_ops(config, image_size)
  expected = conv.resolve_conv_impl(conv_impl, image_size * image_size)
  assert model.image_encoder.encoder.conv_impl == expected
  assert model.composer.conv_impl == expected
  # 'matmul' leaves no native convolution anywhere; 'xla' keeps every one (encoder + composer);
  # 'mixed' (auto on CPU at small sizes) keeps some, by layer (conv.layer_impl).
  if expected == "mixed":
    assert 0 < native < CONVS, native
  else:
    assert native == (0 if expected == "matmul" else CONVS), (expected, native)


def _xla_conv(x, kernel, strides, padding):
  """The reference: XLA's convolution and its autodiff, NHWC / HWIO."""
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _fused_computations(hlo_text):
  """{name: body} of the fused computations in a compiled HLO module's text."""
  bodies, name = {}, None
  for line in hlo_text.splitlines():
    if line.startswith("%fused_computation"):
      name, bodies[line.split()[0]] = line.split()[0], []
    elif line.startswith("}"):
      name = None
    elif name is not None:
      bodies[name].append(line)
  return {k: "\n".join(v) for k, v in bodies.items()}


@pytest.mark.parametrize("size,k,strides,padding", [
    (9, 3, (1, 1), ((1, 1), (1, 1))),     # 3x3
    (9, 3, (2, 2), ((1, 1), (1, 1))),     # 3x3 / 2, odd input
    (8, 3, (2, 2), ((1, 1), (1, 1))),     # 3x3 / 2, even input
    (8, 1, (2, 2), ((0, 0), (0, 0))),     # 1x1 / 2 shortcut
    (8, 1, (1, 3), ((1, 0), (0, 2))),     # 1x1, padded, strides that skip the last column
    (16, 7, (2, 2), ((3, 3), (3, 3))),    # the 7x7 / 2 stem
    (9, 3, (1, 2), ((1, 1), (0, 1))),     # mixed strides, asymmetric padding
    (9, 3, (2, 2), ((3, 2), (2, 3))),     # padding wider than the kernel: some phases crop g
    (11, 5, (3, 3), ((2, 2), (2, 2))),    # stride 3: nine phases
    (7, 2, (2, 2), ((0, 0), (0, 0))),     # even kernel, odd input
])
def test_native_conv_cpu_equals_xla_conv_and_its_gradients(size, k, strides, padding):
  rng = np.random.default_rng(0)
  y = jnp.asarray(rng.standard_normal((3, size, size, 5)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((k, k, 5, 4)), jnp.float32)
  scale, shift = jnp.float32(1.5), jnp.float32(-0.2)
  out = jax.eval_shape(lambda x, w: _xla_conv(x, w, strides, padding), y, kernel)
  r = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)

  def loss(conv_fn, y, kernel):
    x = jnp.maximum(y * scale + shift, 0)   # a ReLU of an affine map, as after BatchNorm
    return jnp.sum(r * conv_fn(x, kernel, strides, padding))

  ours = jax.jit(lambda y, k: jax.value_and_grad(functools.partial(loss, conv.native_conv_cpu),
                                                  argnums=(0, 1))(y, k))
  theirs = jax.jit(lambda y, k: jax.value_and_grad(functools.partial(loss, _xla_conv),
                                                    argnums=(0, 1))(y, k))
  (value, grads), (ref_value, ref_grads) = ours(y, kernel), theirs(y, kernel)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  for a, b in zip(grads, ref_grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  if jax.default_backend() == "cpu" and k == 1:
    # A 1x1 kernel's weight gradient is one matmul, not a convolution. (Its operand is
    # read from the stored x through `_materialized`; that this keeps the ReLU out of the
    # copy is measured in docs/benchmarks.md, not checked here.)
    compiled = ours.lower(y, kernel).compile().as_text()
    assert " dot(" in compiled and set(re.findall(r"window=\{size=(\d+x\d+)", compiled)) <= {"1x1"}
    reference = theirs.lower(y, kernel).compile().as_text()
    assert set(re.findall(r"window=\{size=(\d+x\d+)", reference)) - {"1x1"}, "nothing to check"
  elif jax.default_backend() == "cpu":
    # The weight gradient's transpose of x reads the stored ReLU output: no fusion
    # computes the ReLU (a maximum) and a transpose together. XLA's own gradient does.
    def relu_in_transposes(fn):
      fused = _fused_computations(fn.lower(y, kernel).compile().as_text())
      return [k for k, body in fused.items() if " transpose(" in body and " maximum(" in body]
    assert relu_in_transposes(theirs), "the reference no longer fuses: this test checks nothing"
    assert not relu_in_transposes(ours)


def test_native_conv_cpu_gradients_stay_canonical_inside_loops():
  # XLA:CPU adds the transposes that put autodiff's convolutions in its canonical
  # NHWC/HWIO form only outside while loops; inside they run on a slow path. The
  # VJP of native_conv_cpu spells both gradients in the canonical form.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 20)), jnp.float32)
  kernels = jnp.asarray(rng.standard_normal((3, 3, 3, 20, 20)) * 0.1, jnp.float32)

  def scanned_grad(conv_fn):
    def loss(kernels, x):
      def body(carry, kernel):
        return jnp.maximum(conv_fn(carry, kernel, (1, 1), ((1, 1), (1, 1))), 0), None
      y, _ = jax.lax.scan(body, x, kernels)
      return jnp.sum(y ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))

  ours, theirs = scanned_grad(conv.native_conv_cpu), scanned_grad(_xla_conv)
  # float32 sums in another order (XLA's in-loop path is a different kernel): ~2e-5 apart.
  for a, b in zip(ours(kernels, x), theirs(kernels, x)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  if jax.default_backend() == "cpu":
    def dim_labels(fn):
      return set(re.findall(r"dim_labels=(\S+?),", fn.lower(kernels, x).compile().as_text()))
    assert dim_labels(theirs) - {"b01f_01io->b01f"}, "XLA now canonicalises loops: nothing to check"
    assert dim_labels(ours) == {"b01f_01io->b01f"}
