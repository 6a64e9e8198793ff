"""The TIRG paper's other composers (section 3.1): shapes, gradients, sharding, behaviour.

Show and Tell, Attribute as Operator, Parameter hashing, Relationship, MRN and
FiLM; each gets the shared shape/gradient check of tests/test_models.py, the
sharded == single-device check of tests/test_train.py, and a test of the
property that defines it.
"""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cir_jax import losses
from cir_jax.models import build
from cir_jax.models import composers
from cir_jax.models.composers import param_hashing
from cir_jax.models.composers import relationship
from tests import fakes
from tests import test_models

CASES = [
    ("show_and_tell", {}),
    ("attribute_operator", {}),
    ("attribute_operator", {"rank": 2}),
    ("param_hashing", {"pool_size": 64}),
    ("relationship", {"hidden_dim": 8, "dropout": 0.1}),
    ("mrn", {"num_blocks": 2}),
    ("film", {}),                   # every residual block (the paper's FiLM)
    ("film", {"blocks": (-1,)}),    # the last block only: the encoder's output map
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CASES]


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_shapes_and_gradients_reach_composer_and_text_encoder(name, kwargs):
  test_models.test_composer_shapes_and_gradients(name, kwargs)


# 1-vs-8-device equality is tested where a collective or batch statistics are
# involved (tests/test_train.py: a BatchNorm ResNet with TIRG and the global loss;
# test_set_negatives.py; test_ssn.py); the composers add neither.


def _model_and_variables(name, **kwargs):
  config = fakes.tiny_config(name)
  config.model.composer_kwargs = kwargs
  model = build.build_model(config.model, vocab_size=20)
  batch = test_models._batch()  # pylint: disable=protected-access
  return model, model.init(jax.random.key(0), batch)


def _query(model, variables, batch):
  return model.apply(variables, batch["ref_image"], batch["text_ids"], batch["text_mask"],
                     method=model.encode_query)[0]


def _replace(variables, path, fn):
  """Copy of `variables` with fn applied to every params leaf under `path` (a key prefix)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables["params"]))
  flat = {k: fn(k, v) if k[:len(path)] == path else v for k, v in flat.items()}
  return {**variables, "params": flax.traverse_util.unflatten_dict(flat)}


@pytest.mark.parametrize("blocks", [None, (-1,), (0,), (0, 1)])
def test_film_with_gamma_one_beta_zero_is_the_identity(blocks):
  model, variables = _model_and_variables("film", blocks=blocks)
  batch = test_models._batch()  # pylint: disable=protected-access
  generators = set(variables["params"]["composer"])
  num_blocks = 2  # resnet_tiny: one block in each of two stages
  expected = range(num_blocks) if blocks is None else [b % num_blocks for b in blocks]
  assert generators == {f"film_{b}" for b in expected}
  # Zero generator weights: gamma = 1 + 0, beta = 0 -> the unmodulated image embedding.
  identity = _replace(variables, ("composer",), lambda k, v: jnp.zeros_like(v))
  unmodulated = model.apply(identity, batch["ref_image"], method=model.encode_target)
  np.testing.assert_allclose(_query(model, identity, batch), unmodulated, atol=1e-5)
  # And the (randomly initialised) generators do change it, at every named block.
  assert np.abs(_query(model, variables, batch) - unmodulated).max() > 1e-3


def test_film_first_block_gets_a_gradient_from_the_loss():
  # The default FiLM modulates every block; the first block's generator must learn from the
  # training loss (with the last-map-only FiLM it had no parameters at all).
  config = fakes.tiny_config("film")
  model, variables = _model_and_variables("film")
  batch = test_models._batch()  # pylint: disable=protected-access
  loss_fn = losses.get_loss_fn(config.loss)

  def loss(params):
    (query, target, _), _ = model.apply({**variables, "params": params}, batch, train=True,
                                        mutable=["batch_stats"],
                                        rngs={"dropout": jax.random.key(1)})
    return loss_fn(query, target, jnp.arange(query.shape[0]))

  grads = jax.grad(loss)(variables["params"])["composer"]
  assert set(grads) == {"film_0", "film_1"}
  for block in ("film_0", "film_1"):
    norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads[block]))))
    assert np.isfinite(norm) and norm > 1e-6, (block, norm)


def test_film_rejects_blocks_the_encoder_does_not_have():
  with pytest.raises(ValueError, match=r"film blocks \[5\] do not exist: the image encoder has "
                     r"2 residual blocks \(valid indices -2..1\)"):
    _model_and_variables("film", blocks=(0, 5))


def test_mrn_with_zero_block_weights_returns_the_text_feature():
  model, variables = _model_and_variables("mrn", num_blocks=3)
  d = fakes.tiny_config().model.embed_dim
  params = _replace(variables, ("composer",), lambda k, v: jnp.zeros_like(v))
  params = _replace(params, ("composer", "out"),
                    lambda k, v: jnp.eye(d) if k[-1] == "kernel" else jnp.zeros_like(v))
  batch = test_models._batch()  # pylint: disable=protected-access
  text = model.apply(params, batch["text_ids"], batch["text_mask"],
                     method=lambda m, ids, mask: m.text_encoder(ids, mask)["pooled"])
  scale = params["params"]["norm_scale"]
  expected = scale * text / jnp.linalg.norm(text, axis=1, keepdims=True)
  np.testing.assert_allclose(_query(model, params, batch), expected, atol=1e-5)


def test_param_hashing_weights_are_the_pool_with_fixed_signs():
  d, c, pool_size = 6, 7, 5
  index, sign = param_hashing.hash_tables(d, c, pool_size, seed=3)
  again = param_hashing.hash_tables(d, c, pool_size, seed=3)
  np.testing.assert_array_equal(index, again[0])
  np.testing.assert_array_equal(sign, again[1])
  assert set(np.unique(sign)) == {-1.0, 1.0} and index.min() >= 0 and index.max() < pool_size
  assert not np.array_equal(index, param_hashing.hash_tables(d, c, pool_size, seed=4)[0])

  composer = composers.get_composer("param_hashing", embed_dim=d, pool_size=pool_size,
                                    hash_seed=3)
  rng = np.random.default_rng(0)
  image = {"pooled": jnp.asarray(rng.normal(size=(2, c)), jnp.float32),
           "embedding": jnp.asarray(rng.normal(size=(2, d)), jnp.float32)}
  text = {"pooled": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)}
  variables = composer.init(jax.random.key(0), image, text)
  assert set(variables["params"]) == {"pool_fc"}  # the hash tables are not parameters
  out, _ = composer.apply(variables, image, text)
  fc = variables["params"]["pool_fc"]
  pool = np.asarray(text["pooled"] @ fc["kernel"] + fc["bias"])
  for b in range(2):
    w = np.array([[sign[i, j] * pool[b, index[i, j]] for j in range(c)] for i in range(d)])
    np.testing.assert_allclose(out[b], w @ np.asarray(image["pooled"][b]), rtol=1e-5,
                               atol=1e-6)


def test_param_hashing_replaces_the_image_fc():
  # TIRG paper 3.1: the hashed T_t "is used to replace a fc layer in the image CNN". The
  # query is W(t) applied to the trunk's pooled feature: the fc (target_proj) that maps it
  # for targets is not on the query path at all.
  model, variables = _model_and_variables("param_hashing", pool_size=64)
  batch = test_models._batch()  # pylint: disable=protected-access
  changed = _replace(variables, ("target_proj",), lambda k, v: v + 1.0)
  np.testing.assert_array_equal(_query(model, variables, batch), _query(model, changed, batch))
  assert np.abs(model.apply(variables, batch["target_image"], method=model.encode_target)
                - model.apply(changed, batch["target_image"], method=model.encode_target)
                ).max() > 1e-3


def test_relation_network_sums_every_ordered_pair_and_is_a_set_function():
  # The plain RN of Santoro et al. (normalize=False); the BatchNorms of our default
  # are the identity at initialisation in eval mode (running mean 0, variance 1).
  rn = relationship.RelationNetwork(out_dim=3, hidden_dim=5, g_layers=2, f_layers=1,
                                    normalize=False)
  rng = np.random.default_rng(0)
  objects = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
  query = jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)
  variables = rn.init(jax.random.key(0), objects, query)
  out = rn.apply(variables, objects, query)
  # Reference: g_theta on each explicit concatenation [o_i, o_j, q], summed, then f_phi.
  p = variables["params"]
  dense = lambda x, name: x @ p[name]["kernel"] + p[name].get("bias", 0.0)
  w1 = jnp.concatenate([p["g0_left"]["kernel"], p["g0_right"]["kernel"], p["g0_text"]["kernel"]])
  for b in range(2):
    total = 0.0
    for i in range(4):
      for j in range(4):
        pair = jnp.concatenate([objects[b, i], objects[b, j], query[b]])
        g = jax.nn.relu(pair @ w1 + p["g0_left"]["bias"])
        total = total + jax.nn.relu(dense(g, "g1"))
    expected = dense(jax.nn.relu(dense(total, "f0")), "f_out")
    np.testing.assert_allclose(out[b], expected, rtol=1e-4, atol=1e-5)
  permuted = rn.apply(variables, objects[:, ::-1][:, jnp.array([1, 3, 0, 2])], query)
  np.testing.assert_allclose(permuted, out, rtol=1e-5, atol=1e-5)


def _composition_split(num_images=8, num_texts=4, seed=0):
  """Query (image m, text k) -> target image (m + k + 1) % num_images: every reference
  has num_texts different targets, so image-only is right for at most 1 in num_texts."""
  from cir_jax.data.tables import RetrievalSplit  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (num_images, 32, 32, 3), dtype=np.uint8)
  words = ["red", "blue", "cube", "sphere", "small", "large"][:num_texts]
  m, k = np.meshgrid(np.arange(num_images), np.arange(num_texts), indexing="ij")
  m, k = m.ravel(), k.ravel()
  target = (m + k + 1) % num_images
  return RetrievalSplit(
      name="composition/train", images=images, image_labels=np.arange(num_images),
      image_ids=[f"img{i}" for i in range(num_images)], ref_index=m.astype(np.int64),
      target_index=target.astype(np.int64), target_label=target.astype(np.int64),
      texts=[words[i] for i in k]).validate()


def test_relationship_fits_a_composition_that_image_only_cannot(monkeypatch):
  """The trainer's own step on a task that needs image AND text: it used to collapse (loss
  stuck at log 2, R@1 at chance) before the composer's BatchNorms (relationship.py)."""
  from tests import pretrained_fakes  # pylint: disable=g-import-not-at-top
  config = fakes.tiny_config("relationship", **{"loss.name": "soft_triplet",
                                                "batch_size": 16, "eval.ks": (1,)})
  config.model.composer_kwargs = {"hidden_dim": 32, "dropout": 0.1}
  split = _composition_split()
  pretrained_fakes.use_split(monkeypatch, config, split)
  run = fakes.run_steps(config, split, devices=1, steps=120, evaluate=True)
  losses_, after = np.asarray(run.losses), run.after
  assert losses_[-10:].mean() < 0.5 < 0.69 < losses_[:5].mean(), losses_
  assert after["R@1"] > 50.0, after  # image-only can reach at most 25 (1 in 4 targets)


def test_relationship_sees_where_cells_are():
  # Coordinates tag each cell, so a transposed feature map is a different scene.
  composer = composers.get_composer("relationship", embed_dim=4, hidden_dim=8)
  rng = np.random.default_rng(0)
  fmap = jnp.asarray(rng.normal(size=(2, 3, 3, 5)), jnp.float32)
  text = {"pooled": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)}
  variables = composer.init(jax.random.key(0), {"feature_map": fmap}, text)
  out, _ = composer.apply(variables, {"feature_map": fmap}, text)
  moved, _ = composer.apply(variables, {"feature_map": fmap.transpose(0, 2, 1, 3)}, text)
  assert np.abs(out - moved).max() > 1e-4
  np.testing.assert_allclose(relationship.cell_coordinates(2, 3),
                             [[-1, -1], [-1, 0], [-1, 1], [1, -1], [1, 0], [1, 1]])


def test_show_and_tell_reads_the_image_then_only_the_real_words():
  composer = composers.get_composer("show_and_tell", embed_dim=4, hidden_dim=6)
  rng = np.random.default_rng(0)
  image = {"embedding": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)}
  words = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)
  mask = jnp.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], bool)
  variables = composer.init(jax.random.key(0), image, {"word_embeddings": words, "mask": mask})
  out, _ = composer.apply(variables, image, {"word_embeddings": words, "mask": mask})
  # Changing the padded positions changes nothing ...
  noisy = jnp.where(mask[..., None], words, 100.0)
  same, _ = composer.apply(variables, image, {"word_embeddings": noisy, "mask": mask})
  np.testing.assert_allclose(same, out, atol=1e-6)
  # ... while the last real word and the image both matter.
  last_word = words.at[0, 1].add(1.0)
  changed, _ = composer.apply(variables, image, {"word_embeddings": last_word, "mask": mask})
  assert np.abs(changed[0] - out[0]).max() > 1e-4
  np.testing.assert_allclose(changed[1], out[1], atol=1e-6)
  other_image = {"embedding": image["embedding"] + 1.0}
  moved, _ = composer.apply(variables, other_image, {"word_embeddings": words, "mask": mask})
  assert np.abs(moved - out).max() > 1e-4


@pytest.mark.parametrize("rank", [0, 2])
def test_attribute_operator_applies_a_near_identity_text_matrix(rank):
  composer = composers.get_composer("attribute_operator", rank=rank)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
  t = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
  variables = composer.init(jax.random.key(0), {"embedding": x}, {"pooled": t})
  out, _ = composer.apply(variables, {"embedding": x}, {"pooled": t})
  # T_t starts near the identity ...
  np.testing.assert_allclose(out, x, atol=0.05)
  # ... and is exactly T_t phi_x with T_t = I + reshape(fc(phi_t)).
  p = variables["params"]
  if rank == 0:
    fc = p["operator_fc"]
    operator = np.eye(4) + np.asarray(t @ fc["kernel"] + fc["bias"]).reshape(2, 4, 4)
  else:
    u = np.asarray(t @ p["operator_u"]["kernel"] + p["operator_u"]["bias"]).reshape(2, 4, rank)
    v = np.asarray(t @ p["operator_v"]["kernel"] + p["operator_v"]["bias"]).reshape(2, 4, rank)
    operator = np.eye(4) + u @ v.transpose(0, 2, 1)
  np.testing.assert_allclose(out, np.einsum("bij,bj->bi", operator, x), rtol=1e-5, atol=1e-6)
