"""The 2D->3D setting of the TIRG paper (Table 4): 2D query renders, 3D gallery, own encoders."""
import jax
import numpy as np
import pytest

from cir_jax import experiment
from cir_jax import train
from cir_jax.data import registry
from configs import tirg_css

TINY_CSS = {"data.image_size": 32, "data.num_scenes": 20, "data.num_queries": 50,
            "model.image_encoder": "resnet_tiny", "model.embed_dim": 16, "model.word_dim": 8,
            "model.text_hidden_dim": 16, "batch_size": 8, "eval.batch_size": 16,
            "eval.block_size": 8, "log_every_steps": 1}


def tiny_css_config(arg, data_dir, **overrides):
  """configs/tirg_css.py:`arg` shrunk to a tiny CSS and the tiny ResNet."""
  config = tirg_css.get_config(arg)
  for key, value in {**TINY_CSS, "data.data_dir": str(data_dir), **overrides}.items():
    node, *path = config, *key.split(".")
    for p in path[:-1]:
      node = node[p]
    node[path[-1]] = value
  return config


@pytest.mark.slow
def test_query_2d_trains_and_evaluates_end_to_end(tmp_path):
  config = tiny_css_config("cpu,query_2d,steps=3", tmp_path / "tfds")
  assert config.data.query_render == "2d" and config.model.separate_query_encoder
  split = registry.load_split(config.data, "test", log=lambda _: None)
  # Queries come from the 2D renders of the same scenes whose 3D renders form the gallery.
  assert split.query_images is not None and split.query_images.shape == split.images.shape
  assert not np.array_equal(split.query_images, split.images)

  results = train.train_and_evaluate(config, tmp_path / "run")
  assert results["step"] == 3 and results["num_queries"] == len(split.texts)
  assert set(results["metrics"]) >= {"R@1", "R@5", "R@10", "R@50"}
  assert all(0.0 <= v <= 100.0 for v in results["metrics"].values())
  exp, step = experiment.restore_for_evaluation(config, tmp_path / "run", log=lambda _: None)
  assert step == 3
  params = jax.device_get(exp.state.params)
  assert {"query_image_encoder", "query_proj", "image_encoder", "target_proj"} <= set(params)
