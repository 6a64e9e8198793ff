"""BERT loaded from tiny transformers checkpoints matches PyTorch, incl. an appended image token."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch  # a required test extra (pyproject [test]): missing it is an error
import transformers

from cir_jax import pretrained  # pylint: disable=g-import-not-at-top
from cir_jax.models import bert

TOL = 1e-5


def _config():
  return transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=37,
                                 max_position_embeddings=24)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.BertModel(_config()).eval()
  directory = tmp_path_factory.mktemp("bert")
  model.save_pretrained(directory)
  return str(directory), model


def _batch():
  """[CLS] w... [SEP] [PAD]... ids [3, 12], mask, and token types with a second segment."""
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 99, (3, 12))
  mask = np.zeros((3, 12), np.int64)
  for row, n in enumerate((6, 12, 9)):
    ids[row, 0], ids[row, n - 1], ids[row, n:] = 2, 3, 0
    mask[row, :n] = 1
  types = np.zeros((3, 12), np.int64)
  types[1, 7:] = 1
  return ids, mask, types


def _diff(a, b):
  return float(np.abs(np.asarray(a) - b.detach().numpy()).max())


def test_bert_matches_transformers(bert_dir):
  directory, model = bert_dir
  module, variables = pretrained.load_pretrained(directory, "bert")
  ids, mask, types = _batch()
  extra = np.random.default_rng(1).standard_normal((3, 1, 32)).astype(np.float32)
  extra_mask = np.array([[1], [1], [0]])
  i32 = lambda x: x.astype(np.int32)

  @jax.jit
  def run(variables):
    plain = module.apply(variables, i32(ids), i32(mask), i32(types))
    with_image = module.apply(variables, i32(ids), i32(mask), i32(types),
                              extra_embeddings=extra, extra_mask=i32(extra_mask))
    return plain, with_image

  (pooled, aux), (pooled_img, aux_img) = run(variables)
  with torch.no_grad():
    t_ids, t_mask, t_types = torch.tensor(ids), torch.tensor(mask), torch.tensor(types)
    ref = model(input_ids=t_ids, attention_mask=t_mask, token_type_ids=t_types)
    # OSCAR-style image token: appended after the embedding layer, with its own mask
    # entry, then the same encoder and pooler.
    tokens = torch.cat([model.embeddings(input_ids=t_ids, token_type_ids=t_types),
                        torch.from_numpy(extra)], dim=1)
    full_mask = torch.cat([t_mask, torch.tensor(extra_mask)], dim=1)
    additive = (1.0 - full_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    ref_last_img = model.encoder(tokens, attention_mask=additive).last_hidden_state
    ref_pooled_img = model.pooler(ref_last_img)
  assert aux_img["last_hidden_state"].shape == (3, 13, 32)
  diffs = {
      "last_hidden_state": _diff(aux["last_hidden_state"], ref.last_hidden_state),
      "pooled": _diff(pooled, ref.pooler_output),
      "last_hidden_state (+image token)": _diff(aux_img["last_hidden_state"], ref_last_img),
      "pooled (+image token)": _diff(pooled_img, ref_pooled_img),
  }
  print("BERT max abs diff:", diffs)
  assert max(diffs.values()) <= TOL, diffs
  # The image token changes the text tokens only where it is attended.
  changed = aux_img["last_hidden_state"][:2, :12] - aux["last_hidden_state"][:2]
  assert float(np.abs(changed).max()) > 1e-3
  np.testing.assert_allclose(aux_img["last_hidden_state"][2, :12], aux["last_hidden_state"][2],
                             atol=TOL)
  np.testing.assert_array_equal(aux_img["mask"][:, -1], [True, True, False])


def test_masked_lm_checkpoint_loads_without_heads(tmp_path):
  """BertForMaskedLM: `bert.` prefix, `cls.*` head skipped, no pooler."""
  torch.manual_seed(1)
  model = transformers.BertForMaskedLM(_config()).eval()
  model.save_pretrained(tmp_path)
  module, variables = pretrained.load_pretrained(str(tmp_path), "bert")
  assert not module.add_pooling_layer and "pooler" not in variables["params"]
  ids, mask, _ = _batch()
  _, aux = jax.jit(module.apply)(variables, ids.astype(np.int32), mask.astype(np.int32))
  with torch.no_grad():
    ref = model.bert(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  assert _diff(aux["last_hidden_state"], ref.last_hidden_state) <= TOL


def test_clip_checkpoint_is_not_bert(tmp_path, bert_dir):
  torch.manual_seed(2)
  config = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       max_position_embeddings=24)
  transformers.CLIPTextModel(config).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="model_type 'clip_text_model'"):
    pretrained.load_pretrained(str(tmp_path), "bert")
  module = pretrained.module_from_config(bert_dir[0], "bert")
  with pytest.raises(ValueError) as err:
    pretrained.load_variables(str(tmp_path), "bert", module)
  message = str(err.value)
  assert "params/embeddings/LayerNorm/bias (32,)" in message  # first missing
  assert "embeddings.position_embedding.weight (24, 32)" in message  # first unexpected


def test_bf16_remat_dropout_train_step_has_gradients(bert_dir):
  directory, _ = bert_dir
  _, variables = pretrained.load_pretrained(directory, "bert")
  module = pretrained.module_from_config(directory, "bert", dtype=jnp.bfloat16, remat=True)
  ids, mask, _ = _batch()
  extra = jnp.ones((3, 1, 32))

  @jax.jit
  def grads(params, rng):
    def loss(params, extra):
      pooled, aux = module.apply({"params": params}, ids.astype(np.int32), mask.astype(np.int32),
                                 extra_embeddings=extra, train=True, rngs={"dropout": rng})
      return jnp.sum(pooled**2) + jnp.mean(aux["last_hidden_state"]**2)
    return jax.grad(loss, argnums=(0, 1))(params, extra)

  g1, g_extra = grads(variables["params"], jax.random.key(0))
  g2, _ = grads(variables["params"], jax.random.key(1))
  leaves = jax.tree.leaves(g1)
  assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in leaves)
  assert float(np.abs(g_extra).max()) > 0  # the image token receives gradient
  # Dropout is live in train mode: another rng gives another gradient.
  diff = max(float(np.abs(a - b).max()) for a, b in zip(leaves, jax.tree.leaves(g2)))
  assert diff > 1e-6
  assert isinstance(module, bert.BertEncoder)
