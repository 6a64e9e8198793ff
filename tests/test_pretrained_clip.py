"""CLIP towers loaded from tiny transformers checkpoints match PyTorch outputs.

torch is the reference here only; the library never imports it.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # a required test extra (pyproject [test]): missing it is an error
import transformers

from cir_jax import pretrained  # pylint: disable=g-import-not-at-top
from cir_jax.models import clip

TOL = 1e-5
BOS, EOS = 97, 98  # inside the tiny vocabulary of 99


def _config(hidden=32, eos=EOS):
  return transformers.CLIPConfig(
      text_config=dict(vocab_size=99, hidden_size=hidden, intermediate_size=37,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                       bos_token_id=BOS, eos_token_id=eos, pad_token_id=eos),
      vision_config=dict(hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, image_size=32, patch_size=8),
      projection_dim=24)


def _save(model, directory, **kwargs):
  model.save_pretrained(directory, **kwargs)
  return str(directory)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.CLIPModel(_config()).eval()
  return _save(model, tmp_path_factory.mktemp("clip")), model


def _images(n=3, seed=0):
  """NHWC float32 images and their NCHW torch twin."""
  images = np.random.default_rng(seed).standard_normal((n, 32, 32, 3)).astype(np.float32)
  return images, torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


def _texts():
  """Right-padded ids [4, 10] (pad = EOS, as OpenAI's tokenizer pads) and their mask."""
  rng = np.random.default_rng(1)
  ids = rng.integers(1, BOS, (3, 10))
  ids[:, 0] = BOS
  lengths = [5, 10, 8]
  mask = np.zeros((3, 10), np.int64)
  for row, n in enumerate(lengths):
    ids[row, n - 1:] = EOS
    mask[row, :n] = 1
  # Row 3 = row 0 with other ids under its padding: the mask must hide them.
  garbage = ids[0].copy()
  garbage[5:] = rng.integers(1, BOS, 5)
  return np.concatenate([ids, garbage[None]]), np.concatenate([mask, mask[:1]])


def _diff(a, b):
  return float(np.abs(np.asarray(a) - b.detach().numpy()).max())


def test_vision_tower_matches_transformers(clip_dir):
  directory, model = clip_dir
  module, variables = pretrained.load_pretrained(directory, "clip_vision")
  images, pixels = _images()
  embedding, aux = jax.jit(module.apply)(variables, images)
  with torch.no_grad():
    ref = model.vision_model(pixel_values=pixels)
    ref_embeds = model.get_image_features(pixel_values=pixels).pooler_output
    ref_full = model(pixel_values=pixels, input_ids=torch.tensor(_texts()[0]))
  assert aux["last_hidden_state"].shape == (3, 17, 32)  # CLS + 4x4 patches
  diffs = {
      "last_hidden_state": _diff(aux["last_hidden_state"], ref.last_hidden_state),
      "pooled": _diff(aux["pooled"], ref.pooler_output),
      "image_embeds (projected)": _diff(embedding, ref_embeds),
      "image_embeds (normalised)": _diff(
          embedding / jnp.linalg.norm(embedding, axis=-1, keepdims=True), ref_full.image_embeds),
  }
  print("CLIP vision max abs diff:", diffs)
  assert max(diffs.values()) <= TOL, diffs


def test_text_tower_matches_transformers_with_padding(clip_dir):
  directory, model = clip_dir
  module, variables = pretrained.load_pretrained(directory, "clip_text")
  assert module.eos_token_id == EOS
  ids, mask = _texts()
  embedding, aux = jax.jit(module.apply)(variables, ids.astype(np.int32), mask.astype(np.int32))
  with torch.no_grad():
    t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
    ref = model.text_model(input_ids=t_ids, attention_mask=t_mask)
    ref_embeds = model.get_text_features(input_ids=t_ids, attention_mask=t_mask).pooler_output
    ref_full = model(input_ids=t_ids, attention_mask=t_mask, pixel_values=_images()[1])
  np.testing.assert_array_equal(aux["eos_index"], [4, 9, 7, 4])
  diffs = {
      "last_hidden_state": _diff(aux["last_hidden_state"], ref.last_hidden_state),
      "pooled": _diff(aux["pooled"], ref.pooler_output),
      "text_embeds (projected)": _diff(embedding, ref_embeds),
      "text_embeds (normalised)": _diff(
          embedding / jnp.linalg.norm(embedding, axis=-1, keepdims=True), ref_full.text_embeds),
  }
  print("CLIP text max abs diff:", diffs)
  assert max(diffs.values()) <= TOL, diffs
  # Padding is invisible: what sits under the mask does not change the pooled output.
  np.testing.assert_allclose(embedding[3], embedding[0], atol=TOL)


def test_legacy_eos_token_id_2_pools_highest_id(tmp_path):
  """Configs written before transformers PR #24773 (eos_token_id=2) pool at argmax(ids)."""
  torch.manual_seed(1)
  config = _config(eos=2).text_config
  config.projection_dim = 24
  model = transformers.CLIPTextModelWithProjection(config).eval()
  directory = _save(model, tmp_path)
  module, variables = pretrained.load_pretrained(directory, "clip_text")
  assert module.eos_token_id == 2 and module.projection_dim == 24
  ids, mask = _texts()
  ids[1, 3] = 98  # a second 98 earlier in the row: argmax picks the first maximum
  embedding, aux = jax.jit(module.apply)(variables, ids.astype(np.int32), mask.astype(np.int32))
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  np.testing.assert_array_equal(aux["eos_index"], np.argmax(ids, axis=-1))
  assert _diff(embedding, ref.text_embeds) <= TOL
  assert _diff(aux["last_hidden_state"], ref.last_hidden_state) <= TOL


def test_bare_vision_model_checkpoint_has_no_projection(tmp_path):
  """transformers 5 saves CLIPVisionModel without the `vision_model.` prefix."""
  torch.manual_seed(2)
  model = transformers.CLIPVisionModel(_config().vision_config).eval()
  directory = _save(model, tmp_path)
  module, variables = pretrained.load_pretrained(directory, "clip_vision")
  assert module.projection_dim is None
  images, pixels = _images(2, seed=3)
  embedding, aux = jax.jit(module.apply)(variables, images)
  with torch.no_grad():
    ref = model(pixel_values=pixels)
  assert _diff(embedding, ref.pooler_output) <= TOL
  assert _diff(aux["last_hidden_state"], ref.last_hidden_state) <= TOL


def test_sharded_checkpoint_with_index_loads(clip_dir, tmp_path):
  _, model = clip_dir
  directory = _save(model, tmp_path, max_shard_size="40KB")
  files = sorted(os.listdir(directory))
  assert pretrained.INDEX_NAME in files and pretrained.WEIGHTS_NAME not in files
  assert len(pretrained.weight_files(directory)) > 1
  _, sharded = pretrained.load_pretrained(directory, "clip_vision")
  _, single = pretrained.load_pretrained(clip_dir[0], "clip_vision")
  jax.tree.map(np.testing.assert_array_equal, sharded, single)


def test_bf16_checkpoint_is_read_into_float32_params(tmp_path):
  # safetensors.numpy cannot read BF16; our reader parses the file layout itself.
  torch_model = transformers.CLIPModel(_config()).to(torch.bfloat16)
  directory = _save(torch_model, tmp_path)
  reference = {k: v.float().numpy() for k, v in torch_model.state_dict().items()}
  state = pretrained.read_state(directory)
  assert set(state) == set(reference)
  for name, value in state.items():  # every value, bit for bit (bf16 -> f32 is exact)
    assert str(value.dtype) == "bfloat16", name
    np.testing.assert_array_equal(np.asarray(value, np.float32), reference[name], err_msg=name)
  _, variables = pretrained.load_pretrained(directory, "clip_text")
  kernel = variables["params"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(
      kernel, reference["text_model.encoder.layers.0.mlp.fc1.weight"].T)


def test_missing_weights_fail_clearly(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip"}))
  with pytest.raises(FileNotFoundError) as err:
    pretrained.load_pretrained(str(tmp_path), "clip_vision")
  message = str(err.value)
  assert str(tmp_path) in message
  assert "model.safetensors" in message and "model.safetensors.index.json" in message


def test_other_size_checkpoint_names_mismatched_shapes(tmp_path):
  torch.manual_seed(3)
  directory = _save(transformers.CLIPModel(_config(hidden=48)), tmp_path)
  with pytest.raises(ValueError) as err:
    pretrained.load_variables(directory, "clip_vision", clip.CLIPVisionTiny())
  message = str(err.value)
  print(message)
  assert directory in message and "shape mismatches" in message
  assert ("vision_model.embeddings.class_embedding (48,) -> params/embeddings/class_embedding: "
          "checkpoint gives (48,), model expects (32,)") in message


def test_other_architecture_checkpoint_names_keys(tmp_path):
  torch.manual_seed(4)
  bert_config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=37)
  directory = _save(transformers.BertModel(bert_config), tmp_path)
  with pytest.raises(ValueError, match="model_type 'bert'.*embeddings.LayerNorm.bias"):
    pretrained.load_pretrained(directory, "clip_vision")
  with pytest.raises(ValueError) as err:
    pretrained.load_variables(directory, "clip_vision", clip.CLIPVisionTiny())
  message = str(err.value)
  print(message)
  assert "missing" in message and "params/embeddings/class_embedding (32,)" in message
  assert "unexpected" in message and "embeddings.word_embeddings.weight (99, 32)" in message


def test_merge_params_loads_a_sub_tree_strictly(clip_dir):
  directory, _ = clip_dir
  module, loaded = pretrained.load_pretrained(directory, "clip_vision")
  images = np.zeros((1, 32, 32, 3), np.float32)
  shapes = jax.eval_shape(module.init, jax.random.key(1), images)["params"]
  fresh = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), shapes)
  params = {"image_encoder": fresh, "head": {"kernel": jnp.ones((24, 4))}}
  merged = pretrained.merge_params(params, loaded["params"], "image_encoder")
  jax.tree.map(np.testing.assert_array_equal, merged["image_encoder"], loaded["params"])
  np.testing.assert_array_equal(merged["head"]["kernel"], np.ones((24, 4)))
  assert params["image_encoder"] is fresh  # the input is not modified

  wrong = jax.tree.map(lambda x: x, loaded["params"])
  wrong["visual_projection"] = {"kernel": np.zeros((32, 7), np.float32)}
  del wrong["post_layernorm"]
  with pytest.raises(ValueError) as err:
    pretrained.merge_params(params, wrong, "image_encoder")
  message = str(err.value)
  assert "image_encoder" in message
  assert "post_layernorm/bias (32,)" in message  # missing
  assert "visual_projection/kernel: loaded (32, 7), model (32, 24)" in message
  with pytest.raises(ValueError, match="no 'text_encoder'"):
    pretrained.merge_params(params, loaded["params"], "text_encoder")


def _loss_and_grads(module, params, *inputs):
  def loss(params):
    embedding, aux = module.apply({"params": params}, *inputs)
    return jnp.sum(embedding**2) + jnp.mean(aux["last_hidden_state"]**2), embedding
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize("tower", ["clip_vision", "clip_text"])
def test_bf16_with_remat_close_to_float32_with_gradients(clip_dir, tower):
  directory, model = clip_dir
  images, pixels = _images()
  ids, mask = _texts()
  inputs = (images,) if tower == "clip_vision" else (ids.astype(np.int32), mask.astype(np.int32))
  _, variables = pretrained.load_pretrained(directory, tower)
  fast = pretrained.module_from_config(directory, tower, dtype=jnp.bfloat16, remat=True)
  (_, embedding), grads = _loss_and_grads(fast, variables["params"], *inputs)
  with torch.no_grad():  # the float32 reference
    if tower == "clip_vision":
      ref = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
    else:
      ref = model.get_text_features(input_ids=torch.tensor(ids),
                                    attention_mask=torch.tensor(mask)).pooler_output.numpy()
  assert embedding.dtype == jnp.float32
  err = float(np.abs(embedding - ref).max()) / float(np.abs(ref).max())
  flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])
  assert flat.dtype == np.float32 and np.all(np.isfinite(flat))
  # Every parameter array receives gradient (no silently detached branch).
  assert all(float(np.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  message = f"{tower} bf16+remat vs float32: embedding rel err {err:.2e}"
  if tower == "clip_vision":  # one float32 gradient reference (each compile costs seconds)
    base = pretrained.module_from_config(directory, tower)
    _, ref_grads = _loss_and_grads(base, variables["params"], *inputs)
    ref_flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(ref_grads)])
    rel = np.linalg.norm(flat - ref_flat) / np.linalg.norm(ref_flat)
    message += f", gradient rel err {rel:.2e}"
    assert rel <= 0.1, rel
  print(message)
  assert err <= 5e-2, err
