"""config.init_from: a save_pretrained CLIP directory strictly fills the model's CLIP towers."""
import jax
import numpy as np
import pytest

from cir_jax import checkpoint
from cir_jax import experiment
from configs import ssn_cirr
from tests import fakes as base_fakes
from tests import pretrained_fakes as fakes

@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  return fakes.tiny_clip_checkpoint(tmp_path_factory.mktemp("clip"))


def _restore(config, workdir):
  exp = experiment.build(config, experiment.make_mesh(config), vocab=range(20))
  fresh = jax.device_get(exp.state.params)
  manager = checkpoint.make_manager(workdir, 1)
  return exp.model, fresh, experiment.restore_or_init(exp, manager, lambda *_: None).state


def test_loaded_towers_compute_what_torch_computes(clip_dir, tmp_path):
  # init_from is checked against the PyTorch model itself (not against our loader):
  # the restored state's towers must give transformers' CLIP embeddings.
  import torch  # pylint: disable=g-import-not-at-top
  from tests import test_pretrained_clip as clip_ref  # pylint: disable=g-import-not-at-top
  directory, torch_model = clip_dir
  config = ssn_cirr.get_config("tiny")
  config.init_from = directory
  model, fresh, state = _restore(config, tmp_path)
  params = jax.device_get(state.params)
  images, pixels = clip_ref._images()  # pylint: disable=protected-access
  ids, mask = clip_ref._texts()  # pylint: disable=protected-access
  image_emb, _ = model.image_encoder.encoder.apply(
      {"params": params["image_encoder"]["encoder"]}, images)
  text_emb, _ = model.text_encoder.encoder.apply(
      {"params": params["text_encoder"]["encoder"]}, ids.astype(np.int32), mask.astype(np.int32))
  with torch.no_grad():
    ref_image = torch_model.get_image_features(pixel_values=pixels).pooler_output.numpy()
    ref_text = torch_model.get_text_features(input_ids=torch.tensor(ids),
                                             attention_mask=torch.tensor(mask)).pooler_output.numpy()
  np.testing.assert_allclose(image_emb, ref_image, atol=clip_ref.TOL, rtol=0)
  np.testing.assert_allclose(text_emb, ref_text, atol=clip_ref.TOL, rtol=0)
  # The composer keeps its fresh initialisation.
  for a, b in zip(jax.tree.leaves(params["composer"]), jax.tree.leaves(fresh["composer"])):
    np.testing.assert_array_equal(a, b)


def test_checkpoint_without_projection_names_the_missing_key(clip_dir, tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  _, torch_model = clip_dir
  transformers.CLIPVisionModel(torch_model.config.vision_config).save_pretrained(tmp_path / "bare")
  config = ssn_cirr.get_config("tiny")
  config.init_from = str(tmp_path / "bare")
  with pytest.raises(ValueError, match=r"1 missing \(in the model, not in the checkpoint\), "
                     r"first: params/visual_projection/kernel"):
    _restore(config, tmp_path / "run")


def test_init_from_a_directory_without_a_checkpoint_names_it(tmp_path):
  # Every ResNet tower is loadable (tests/test_convert_torchvision_resnet.py): an empty
  # directory is named, not skipped.
  config = base_fakes.tiny_config("tirg")
  config.init_from = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=f"no weights in checkpoint directory '{tmp_path}'"):
    _restore(config, tmp_path / "run")
