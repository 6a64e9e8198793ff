"""HF-layout ResNets loaded from tiny transformers checkpoints match PyTorch (eval-mode BN)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # a required test extra (pyproject [test]): missing it is an error
import transformers

from cir_jax import pretrained  # pylint: disable=g-import-not-at-top

TOL = 1e-5


def _randomise_batchnorm(model, seed):
  """Non-trivial BN statistics/affine so eval mode actually exercises them."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
        m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
        m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
  return model.eval()


def _save(model_cls, tmp_path, seed, **config):
  torch.manual_seed(seed)
  model = _randomise_batchnorm(model_cls(transformers.ResNetConfig(**config)), seed)
  model.save_pretrained(tmp_path)
  return str(tmp_path), model


TINY_BOTTLENECK = dict(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2],
                       layer_type="bottleneck")


def _images(seed=0):
  images = np.random.default_rng(seed).standard_normal((2, 32, 32, 3)).astype(np.float32)
  return images, torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


def _compare(module, variables, model, images, pixels):
  pooled, aux = jax.jit(module.apply)(variables, images)
  with torch.no_grad():
    ref = model(pixel_values=pixels)
  ref_map = ref.last_hidden_state.permute(0, 2, 3, 1).numpy()  # NCHW -> NHWC
  ref_pooled = ref.pooler_output[:, :, 0, 0].numpy()
  diffs = {"pooled": float(np.abs(np.asarray(pooled) - ref_pooled).max()),
           "feature_map": float(np.abs(np.asarray(aux["feature_map"]) - ref_map).max())}
  assert aux["feature_map"].shape == ref_map.shape
  return diffs


@pytest.mark.parametrize("layer_type", ["bottleneck", "basic"])
def test_resnet_matches_transformers(tmp_path, layer_type):
  config = dict(TINY_BOTTLENECK, layer_type=layer_type)
  directory, model = _save(transformers.ResNetModel, tmp_path, 0, **config)
  module, variables = pretrained.load_pretrained(directory, "resnet")
  assert set(variables) == {"params", "batch_stats"}
  stem = variables["batch_stats"]["embedder"]["embedder"]["normalization"]
  np.testing.assert_array_equal(stem["mean"],
                                model.embedder.embedder.normalization.running_mean.numpy())
  diffs = _compare(module, variables, model, *_images())
  print(f"ResNet ({layer_type}) max abs diff:", diffs)
  assert max(diffs.values()) <= TOL, diffs


def test_image_classification_checkpoint_loads_trunk(tmp_path):
  """ResNetForImageClassification (microsoft/resnet-50 layout): `resnet.` prefix, head skipped."""
  directory, model = _save(transformers.ResNetForImageClassification, tmp_path, 1,
                           num_labels=5, **TINY_BOTTLENECK)
  module, variables = pretrained.load_pretrained(directory, "resnet")
  diffs = _compare(module, variables, model.resnet, *_images(1))
  assert max(diffs.values()) <= TOL, diffs


def test_wrong_depth_names_missing_blocks(tmp_path):
  directory, _ = _save(transformers.ResNetModel, tmp_path, 2, **TINY_BOTTLENECK)
  deeper = pretrained.module_from_config(directory, "resnet", depths=(1, 3))
  with pytest.raises(ValueError) as err:
    pretrained.load_variables(directory, "resnet", deeper)
  message = str(err.value)
  assert "missing" in message and "encoder/stages_1/layers_2/" in message


def test_train_mode_bf16_remat_updates_batch_stats_with_gradients(tmp_path):
  directory, model = _save(transformers.ResNetModel, tmp_path, 3, **TINY_BOTTLENECK)
  _, variables = pretrained.load_pretrained(directory, "resnet")
  module = pretrained.module_from_config(directory, "resnet", dtype=jnp.bfloat16, remat=True)
  images, pixels = _images(2)

  @jax.jit
  def step(params, batch_stats):
    def loss(params):
      (pooled, _), updates = module.apply({"params": params, "batch_stats": batch_stats}, images,
                                          train=True, mutable=["batch_stats"])
      return jnp.mean(pooled**2), updates
    grads, updates = jax.grad(loss, has_aux=True)(params)
    evaluated, _ = module.apply({"params": params, "batch_stats": batch_stats}, images)
    return grads, updates, evaluated

  grads, updates, pooled = step(variables["params"], variables["batch_stats"])
  flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
  assert flat.dtype == np.float32 and np.all(np.isfinite(flat)) and np.abs(flat).max() > 0
  old = variables["batch_stats"]["encoder"]["stages_1"]["layers_1"]["layer_2"]["normalization"]
  new = updates["batch_stats"]["encoder"]["stages_1"]["layers_1"]["layer_2"]["normalization"]
  assert new["mean"].dtype == jnp.float32
  assert float(np.abs(new["mean"] - old["mean"]).max()) > 0
  # bf16 eval output stays close to the float32 reference.
  with torch.no_grad():
    ref = model(pixel_values=pixels).pooler_output[:, :, 0, 0].numpy()
  assert float(np.abs(pooled - ref).max()) <= 5e-2 * float(np.abs(ref).max())
