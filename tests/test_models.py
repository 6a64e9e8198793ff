"""Shapes, gradients and invariants of the encoders, composers and retrieval model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cir_jax.models import build
from cir_jax.models import composers
from cir_jax.models import hf_resnet
from cir_jax.models import text_lstm
from tests import fakes

B, S, L = 4, 32, 6
COMPOSER_CASES = [
    ("image_only", {}), ("text_only", {}), ("concat", {}), ("tirg", {}),
    ("tirg", {"use_gate": False}), ("tirg", {"use_residual": False}),
    ("tirg_lastconv", {}), ("tirg_lastconv", {"use_gate": False}),
]


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  mask = np.arange(L)[None] < rng.integers(1, L + 1, B)[:, None]
  return {
      "ref_image": jnp.asarray(rng.integers(0, 256, (B, S, S, 3)), jnp.uint8),
      "target_image": jnp.asarray(rng.integers(0, 256, (B, S, S, 3)), jnp.uint8),
      "text_ids": jnp.asarray(np.where(mask, rng.integers(2, 20, (B, L)), 0), jnp.int32),
      "text_mask": jnp.asarray(mask),
  }


def test_resnet_shapes():
  out = hf_resnet.ResNetBasicTiny().init_with_output(jax.random.key(0),
                                                     jnp.zeros((2, 64, 64, 3)))[0][1]
  assert out["feature_map"].shape == (2, 8, 8, 16)
  assert out["pooled"].shape == (2, 16)
  shapes = jax.eval_shape(lambda: hf_resnet.ResNet18().init(jax.random.key(0),
                                                            jnp.zeros((1, 64, 64, 3))))
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
  assert 11.1e6 < n < 11.3e6  # ResNet-18 trunk without the classifier: 11.17M


def test_lstm_pools_last_real_token_and_ignores_padding():
  enc = text_lstm.LSTMTextEncoder(vocab_size=20, word_dim=8, hidden_dim=8, out_dim=8)
  ids = jnp.array([[3, 4, 5, 0, 0, 0]])
  mask = ids > 0
  params = enc.init(jax.random.key(0), ids, mask)
  out = enc.apply(params, ids, mask)
  longer = enc.apply(params, jnp.array([[3, 4, 5, 0, 0, 0, 0, 0]]), jnp.array([[1, 1, 1] + [0] * 5]))
  np.testing.assert_allclose(out["pooled"], longer["pooled"], atol=1e-6)
  np.testing.assert_allclose(out["pooled"][0], enc.apply(params, ids[:, :3], mask[:, :3])["pooled"][0],
                             atol=1e-6)
  assert out["tokens"].shape == (1, 6, 8) and out["word_embeddings"].shape == (1, 6, 8)


@pytest.mark.parametrize("name,kwargs", COMPOSER_CASES)
def test_composer_shapes_and_gradients(name, kwargs):
  config = fakes.tiny_config(name)
  config.model.composer_kwargs = kwargs
  model = build.build_model(config.model, vocab_size=20)
  batch = _batch()
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, batch)

  def loss(params):
    (q, t, _), _ = model.apply({**variables, "params": params}, batch, train=True,
                               rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
    return jnp.sum(q * jnp.roll(t, 1, axis=0)) - jnp.sum(q * t), (q, t)

  grads, (q, t) = jax.grad(loss, has_aux=True)(variables["params"])
  d = config.model.embed_dim
  assert q.shape == (B, d) and t.shape == (B, d)
  # Embeddings are L2-normalised and scaled by the learnable scale (init 4).
  np.testing.assert_allclose(jnp.linalg.norm(q, axis=1), 4.0, rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(t, axis=1), 4.0, rtol=1e-5)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert all(np.isfinite(np.asarray(g)).all() for _, g in flat)
  composer_grads = [g for p, g in flat if "composer" in jax.tree_util.keystr(p)]
  if name not in ("image_only", "text_only"):
    assert composer_grads and any(np.abs(np.asarray(g)).sum() > 0 for g in composer_grads)
  text_grads = [g for p, g in flat if "text_encoder" in jax.tree_util.keystr(p)]
  text_used = name != "image_only"
  assert any(np.abs(np.asarray(g)).sum() > 0 for g in text_grads) == text_used


def test_image_only_query_equals_target_embedding_of_the_reference():
  config = fakes.tiny_config("image_only")
  model = build.build_model(config.model, vocab_size=20)
  batch = _batch()
  variables = model.init(jax.random.key(0), batch)
  q, _ = model.apply(variables, batch["ref_image"], batch["text_ids"], batch["text_mask"],
                     method=model.encode_query)
  t = model.apply(variables, batch["ref_image"], method=model.encode_target)
  np.testing.assert_allclose(q, t, atol=1e-5)


def test_separate_query_encoder_has_its_own_params():
  config = fakes.tiny_config("tirg", **{"model.separate_query_encoder": True})
  model = build.build_model(config.model, vocab_size=20)
  params = model.init(jax.random.key(0), _batch())["params"]
  assert "query_image_encoder" in params and "query_proj" in params
  assert "image_encoder" in params and "target_proj" in params


def test_unknown_names_list_valid_ones():
  with pytest.raises(ValueError, match="valid composers: .*tirg"):
    build.build_model(fakes.tiny_config("tirgg").model, vocab_size=20)
  with pytest.raises(ValueError, match="valid image encoders"):
    build.build_model(fakes.tiny_config(**{"model.image_encoder": "vgg"}).model, vocab_size=20)
  config = fakes.tiny_config("tirg")
  config.model.composer_kwargs = {"use_gat": False}
  with pytest.raises(ValueError, match="no options \\['use_gat'\\]"):
    build.build_model(config.model, vocab_size=20)
  with pytest.raises(ValueError, match="use_gate or use_residual"):
    composers.get_composer("tirg", use_gate=False, use_residual=False).init(
        jax.random.key(0), {"embedding": jnp.zeros((2, 4))}, {"pooled": jnp.zeros((2, 4))})
