"""config.init_from: a save_pretrained CLIP directory strictly fills the model's CLIP towers."""
import jax
import numpy as np
import pytest

from cir_jax import checkpoint
from cir_jax import experiment
from cir_jax import pretrained
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


def test_loaded_towers_equal_the_checkpoint(clip_dir, tmp_path):
  directory, torch_model = clip_dir
  config = ssn_cirr.get_config("tiny")
  config.init_from = directory
  model, fresh, state = _restore(config, tmp_path)
  params = jax.device_get(state.params)
  vision = pretrained.load_variables(directory, "clip_vision", model.image_encoder.encoder)
  text = pretrained.load_variables(directory, "clip_text", model.text_encoder.encoder)
  for got, want in ((params["image_encoder"]["encoder"], vision["params"]),
                    (params["text_encoder"]["encoder"], text["params"])):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)
  # Against the PyTorch tensors themselves (Linear [out, in] -> kernel [in, out]).
  sd = torch_model.state_dict()
  np.testing.assert_array_equal(params["image_encoder"]["encoder"]["visual_projection"]["kernel"],
                                sd["visual_projection.weight"].numpy().T)
  np.testing.assert_array_equal(
      params["text_encoder"]["encoder"]["embeddings"]["token_embedding"]["embedding"],
      sd["text_model.embeddings.token_embedding.weight"].numpy())
  # The composer keeps its fresh initialisation; the params stay replicated on the mesh.
  for a, b in zip(jax.tree.leaves(params["composer"]), jax.tree.leaves(fresh["composer"])):
    np.testing.assert_array_equal(a, b)
  leaf = jax.tree.leaves(state.params)[0]
  assert len(leaf.sharding.device_set) == len(jax.devices())


def test_checkpoint_of_another_size_fails_naming_keys(tmp_path):
  directory, _ = fakes.tiny_clip_checkpoint(tmp_path / "wide", hidden=48)
  config = ssn_cirr.get_config("tiny")
  config.init_from = directory
  with pytest.raises(ValueError, match=r"does not fit CLIPVisionEncoder[\s\S]*shape mismatches, "
                     r"first: vision_model.embeddings.class_embedding \(48,\)"):
    _restore(config, tmp_path / "run")


def test_checkpoint_without_projection_names_the_missing_key(clip_dir, tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  _, torch_model = clip_dir
  transformers.CLIPVisionModel(torch_model.config.vision_config).save_pretrained(tmp_path / "bare")
  config = ssn_cirr.get_config("tiny")
  config.init_from = str(tmp_path / "bare")
  with pytest.raises(ValueError, match=r"1 missing \(in the model, not in the checkpoint\), "
                     r"first: params/visual_projection/kernel"):
    _restore(config, tmp_path / "run")


def test_init_from_without_pretrained_towers_fails(tmp_path):
  config = base_fakes.tiny_config("tirg")
  config.init_from = str(tmp_path)
  with pytest.raises(ValueError, match="no pretrained tower"):
    _restore(config, tmp_path / "run")
