"""CLIP4Cir's Combiner: shapes, the convex mix, frozen CLIP towers, the temperature loss
without a double-counted scale, sharded == single device, configs, and learning."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cir_jax import losses
from cir_jax import train
from configs import combiner_cirr
from configs import combiner_fashioniq
from tests import pretrained_fakes as fakes

RNG = np.random.default_rng(0)
BATCH = {"ref_image": jnp.asarray(RNG.integers(0, 255, (4, 32, 32, 3)), jnp.uint8),
         "target_image": jnp.asarray(RNG.integers(0, 255, (4, 32, 32, 3)), jnp.uint8),
         "text_ids": jnp.asarray(RNG.integers(2, 20, (4, 16)), jnp.int32),
         "text_mask": jnp.ones((4, 16), bool)}


def _model():
  config = combiner_cirr.get_config("tiny")
  model = fakes.build.build_model(config.model, 20)
  variables = jax.jit(model.init)({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                  BATCH)
  return config, model, variables


def test_shapes_convex_mix_and_frozen_towers():
  config, model, variables = _model()
  apply = jax.jit(model.apply)
  query, target, aux = apply(variables, BATCH)
  assert query.shape == target.shape == (4, 32)
  composer = variables["params"]["composer"]
  assert composer["text_projection_layer"]["kernel"].shape == (32, 4 * 32)   # CLIP4Cir's 4x
  assert composer["combiner_layer"]["kernel"].shape == (8 * 32, 8 * 32)      # and 8x widths
  assert np.all((aux["lambda"] > 0) & (aux["lambda"] < 1))
  # With the residual MLP zeroed, the query is exactly the convex mix of the CLIP embeddings.
  params = jax.tree.map(lambda x: x, variables["params"])
  params["composer"]["output_layer"] = jax.tree.map(jnp.zeros_like, composer["output_layer"])
  query, target, aux = apply({"params": params}, BATCH)
  img = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_target))(
      {"params": params}, BATCH["ref_image"])    # normalised CLIP image embedding
  raw_img = jax.jit(lambda v: model.apply(
      v, BATCH["ref_image"], method=lambda m, x: m.image_encoder(
          (x.astype(jnp.float32) / 255 - jnp.asarray(m.image_encoder.pixel_mean))
          / jnp.asarray(m.image_encoder.pixel_std))["projected"]))({"params": params})
  np.testing.assert_allclose(img, raw_img / np.linalg.norm(raw_img, axis=1, keepdims=True),
                             atol=1e-5)
  raw_txt = jax.jit(lambda v: model.apply(
      v, BATCH["text_ids"], BATCH["text_mask"],
      method=lambda m, i, k: m.text_encoder(i, k)["projected"]))({"params": params})
  lam = np.asarray(aux["lambda"])[:, None]
  mix = lam * raw_txt + (1 - lam) * raw_img
  np.testing.assert_allclose(query, mix / np.linalg.norm(mix, axis=1, keepdims=True), atol=1e-5)

  # Frozen CLIP towers get no gradient; the Combiner does.
  def loss(params):
    q, t, _ = model.apply({"params": params}, BATCH, train=True,
                          rngs={"dropout": jax.random.key(2)})
    return losses.temperature_cross_entropy(q, t, jnp.arange(4), config.loss.temperature)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert optax.global_norm(grads["image_encoder"]) == 0
  assert optax.global_norm(grads["text_encoder"]) == 0
  assert optax.global_norm(grads["composer"]) > 0
  assert "norm_scale" not in variables["params"]  # the temperature is the only scale


def test_temperature_ce_loss_uses_the_config_temperature():
  config = combiner_cirr.get_config("tiny")
  fn = losses.get_loss_fn(config.loss)
  q = jnp.eye(4, 8)
  expected = -np.log(np.exp(100.0) / (np.exp(100.0) + 3))
  np.testing.assert_allclose(fn(q, q, jnp.arange(4)), expected, rtol=1e-5)


@pytest.mark.parametrize("module", [combiner_cirr, combiner_fashioniq])
def test_config_runs_one_step_and_one_eval(module, monkeypatch, tmp_path):
  config = module.get_config("tiny")
  assert module.get_config().optimizer.learning_rate == 2e-5
  split = fakes.cirr_like_split(num_sets=9, queries_per_set=1)  # 54 images: R@50 defined
  fakes.use_split(monkeypatch, config, split)
  results = train.train_and_evaluate(config, tmp_path)
  fakes.assert_protocol_results(results, config, split)


@pytest.mark.slow
def test_training_improves_recall_over_untrained(monkeypatch):
  config = combiner_cirr.get_config("tiny")
  config.eval.ks = (1, 5, 10)  # the 24-image generated gallery has no R@50
  config.optimizer.learning_rate = 1e-3
  config.optimizer.freeze = ()            # tiny random towers: let them learn too
  config.model.frozen_image_encoder = config.model.frozen_text_encoder = False
  split = fakes.cirr_like_split(num_sets=4, queries_per_set=8)
  fakes.use_split(monkeypatch, config, split)
  losses_, _, _, before, after = fakes.run_steps(config, split, devices=1, steps=60,
                                                 evaluate=True)
  assert losses_[-10:].mean() < losses_[:10].mean()
  score = lambda m: m["R@1"] + m["R@5"]
  assert score(after) > score(before) + 10, (before, after)
