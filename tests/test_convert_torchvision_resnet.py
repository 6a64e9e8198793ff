"""torchvision ResNet state dict -> tools/convert_torchvision_resnet.py -> our ResNet == torch.

The reference is a plain-torch ResNet with torchvision's module names
(tests/torchvision_reference.py) with random weights and non-trivial BatchNorm
statistics, in eval mode; the converted directory must also be readable by
transformers' ResNetForImageClassification (the microsoft/resnet-18 layout).
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # a required test extra (pyproject [test]): missing it is an error
import transformers

from cir_jax import init_from
from cir_jax import pretrained
from cir_jax.models import build
from configs import tirg_fashion200k
from tests import fakes
from tests import test_models
from tests import torchvision_reference as tv
from tools import convert_torchvision_resnet as convert

TOL = 1e-5


def _images(size, seed=0):
  images = np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)
  return images, torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


def _convert(model, tmp_path):
  """torch.save(state_dict) -> the tool (torch.load weights_only=True) -> a directory."""
  torch.save(model.state_dict(), tmp_path / "resnet.pth")
  directory = tmp_path / "converted"
  convert.main([str(tmp_path / "resnet.pth"), str(directory)])
  return str(directory)


@pytest.fixture(scope="module")
def resnet18_dir(tmp_path_factory):
  model = tv.resnet18(seed=0)
  return _convert(model, tmp_path_factory.mktemp("tv18")), model


def _forward(tower, variables, images):
  return jax.jit(lambda v, x: tower.apply({"params": {"encoder": v["params"]},
                                          "batch_stats": {"encoder": v["batch_stats"]}}, x))(
                                              variables, images)


def test_converted_resnet18_matches_torchvision_layout_forward(resnet18_dir):
  directory, model = resnet18_dir
  config = tirg_fashion200k.get_config()
  config.model.conv_impl = "xla"
  # The tower the TIRG configs build (model.image_encoder='resnet18'), loaded strictly.
  tower = build.build_image_encoder(config.model, 64)
  variables = pretrained.load_variables(directory, "resnet", tower.encoder)
  images, pixels = _images(64)
  # float64 on both sides (the tower returns its map cast to float32): the mapping
  # itself, free of float32 summation-order noise.
  with jax.enable_x64(True):
    tower64 = tower.clone(encoder=tower.encoder.clone(dtype=jnp.float64))
    out64 = _forward(tower64, variables, images.astype(np.float64))
  with torch.no_grad():
    ref64 = model.double().features(pixels.double()).permute(0, 2, 3, 1).numpy()
    ref = model.float().features(pixels).permute(0, 2, 3, 1).numpy()
  out = _forward(tower, variables, images)
  diff64 = float(np.abs(np.asarray(out64["feature_map"]) - ref64).max())
  diff32 = float(np.abs(np.asarray(out["feature_map"]) - ref).max())
  pooled32 = float(np.abs(np.asarray(out["pooled"]) - ref.mean(axis=(1, 2))).max())
  print(f"resnet18 feature map max |diff|: float64 {diff64:.1e}, float32 {diff32:.1e} "
        f"(pooled {pooled32:.1e}; max |value| {np.abs(ref).max():.2f})")
  assert out["feature_map"].shape == ref.shape == (2, 2, 2, 512)
  assert diff64 <= TOL
  # float32: two summation orders through 18 layers; 1e-5 relative to the largest value.
  assert diff32 <= TOL * np.abs(ref).max() and pooled32 <= TOL * np.abs(ref).max()


def test_converted_directory_is_a_transformers_resnet(resnet18_dir):
  directory, model = resnet18_dir
  hf = transformers.ResNetForImageClassification.from_pretrained(directory).eval()
  _, pixels = _images(64, seed=1)
  with torch.no_grad():
    np.testing.assert_allclose(hf(pixel_values=pixels).logits.numpy(), model(pixels).numpy(),
                               atol=TOL, rtol=0)


@flax.struct.dataclass
class _State:
  params: dict
  batch_stats: dict


def test_init_from_a_converted_state_dict_fills_the_image_tower(tmp_path):
  """config.init_from (cir_jax.init_from, as the trainer calls it), checked against torch."""
  model = tv.randomised(tv.ResNet(tv.BasicBlock, (1, 1), widths=(8, 16)), seed=3, image_size=32)
  directory = _convert(model, tmp_path)
  config = fakes.tiny_config("tirg")           # model.image_encoder='resnet_tiny'
  config.init_from = directory
  retrieval = build.build_model(config.model, 20, config.data.image_size)
  variables = jax.jit(retrieval.init)(jax.random.key(0), test_models._batch())  # pylint: disable=protected-access
  fresh = _State(variables["params"], variables["batch_stats"])
  state = init_from.load_into_state(config, retrieval, fresh, log=lambda *_: None)
  images, pixels = _images(32, seed=2)
  out = jax.jit(retrieval.image_encoder.apply)(
      {"params": state.params["image_encoder"],
       "batch_stats": state.batch_stats["image_encoder"]}, images)
  with torch.no_grad():
    ref_map = model.features(pixels).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(out["feature_map"], ref_map, atol=TOL, rtol=0)
  # Only the image tower was loaded: the text encoder and composer keep their initialisation.
  for part in ("text_encoder", "composer"):
    for a, b in zip(jax.tree.leaves(state.params[part]), jax.tree.leaves(fresh.params[part])):
      np.testing.assert_array_equal(a, b)


def test_bottleneck_config_and_unknown_keys():
  state = {k: v.numpy() for k, v in tv.ResNet(tv.Bottleneck, (1, 2), widths=(8, 16)).state_dict()
           .items()}
  config, tensors = convert.convert(state)
  assert (config["layer_type"], config["depths"], config["hidden_sizes"],
          config["embedding_size"]) == ("bottleneck", [1, 2], [32, 64], 8)
  assert "resnet.encoder.stages.1.layers.0.shortcut.normalization.running_var" in tensors
  assert "resnet.encoder.stages.0.layers.0.layer.2.convolution.weight" in tensors
  with pytest.raises(ValueError, match="unexpected key 'head.weight'"):
    convert.convert(dict(state, **{"head.weight": np.zeros(3)}))
