"""CIRPLANT: the image token in BERT, the shared FC + L2 target space, the fixed ResNet,
the HF-tokenizer switch, sharded == single device, the config, and learning."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cir_jax import losses
from cir_jax import train
from configs import cirplant_cirr
from tests import pretrained_fakes as fakes

RNG = np.random.default_rng(0)
BATCH = {"ref_image": jnp.asarray(RNG.integers(0, 255, (4, 32, 32, 3)), jnp.uint8),
         "target_image": jnp.asarray(RNG.integers(0, 255, (4, 32, 32, 3)), jnp.uint8),
         "text_ids": jnp.asarray(RNG.integers(5, 20, (4, 16)), jnp.int32),
         "text_mask": jnp.asarray(np.arange(16)[None] < np.array([[3], [5], [16], [8]]))}


def test_image_token_query_target_space_and_fixed_resnet():
  config = cirplant_cirr.get_config("tiny")
  model = fakes.build.build_model(config.model, 20)
  variables = jax.jit(model.init)({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                  BATCH)
  apply = jax.jit(model.apply)
  query, target, _ = apply(variables, BATCH)
  assert query.shape == target.shape == (4, 32)
  scale = variables["params"]["norm_scale"]
  np.testing.assert_allclose(np.linalg.norm(target, axis=1), scale, rtol=1e-5)  # learnable, 4
  # The query is the BERT output at the image token: it reads the text and the image.
  q_text, _, _ = apply(variables, dict(BATCH, text_ids=BATCH["text_ids"].at[:, 1].add(1)))
  q_image, _, _ = apply(variables, dict(BATCH, ref_image=BATCH["target_image"]))
  assert not np.allclose(q_text, query, atol=1e-5)
  assert not np.allclose(q_image, query, atol=1e-5)
  # Targets: the same FC + L2 norm of the pooled ResNet feature.
  pooled = jax.jit(lambda v, x: model.apply(
      v, x, method=lambda m, y: m.image_encoder(
          (y.astype(jnp.float32) / 255 - jnp.asarray(m.image_encoder.pixel_mean))
          / jnp.asarray(m.image_encoder.pixel_std))["pooled"]))(variables, BATCH["target_image"])
  fc = variables["params"]["composer"]["image_fc"]
  expected = pooled @ fc["kernel"] + fc["bias"]
  expected = scale * expected / np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(target, expected, atol=1e-5)

  # The ResNet is a fixed extractor: no gradient, running BatchNorm statistics untouched.
  def loss(params):
    (q, t, _), updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                     BATCH, train=True, rngs={"dropout": jax.random.key(2)},
                                     mutable=["batch_stats"])
    return losses.soft_triplet_loss(q, t, jnp.arange(4)), updates

  grads, updates = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  assert optax.global_norm(grads["image_encoder"]) == 0
  assert optax.global_norm(grads["composer"]) > 0
  assert optax.global_norm(grads["text_encoder"]) > 0
  for a, b in zip(jax.tree.leaves(updates["batch_stats"]),
                  jax.tree.leaves(variables["batch_stats"])):
    np.testing.assert_array_equal(a, b)


def test_config_with_hf_tokenizer_runs_one_step_and_one_eval(monkeypatch, tmp_path):
  config = cirplant_cirr.get_config("tiny")
  full = cirplant_cirr.get_config()
  assert (full.optimizer.learning_rate, full.batch_size, full.optimizer.schedule) == (
      1e-5, 32, "linear")
  assert full.num_train_steps == 300 * (28_225 // 32) == full.optimizer.total_steps
  config.data.tokenizer = fakes.bert_tokenizer_dir(tmp_path)
  split = fakes.cirr_like_split(num_sets=9, queries_per_set=1)  # 54 images: R@50 defined
  fakes.use_split(monkeypatch, config, split)
  results = train.train_and_evaluate(config, tmp_path / "run")
  fakes.assert_protocol_results(results, config, split)
  assert not (tmp_path / "run" / "vocab.json").exists()  # the HF tokenizer, not a word vocab


@pytest.mark.slow
def test_training_improves_recall_over_untrained(monkeypatch):
  config = cirplant_cirr.get_config("tiny")
  config.eval.ks = (1, 5, 10)  # the 24-image generated gallery has no R@50
  config.optimizer.learning_rate = 1e-3
  config.optimizer.freeze = ()            # tiny random ResNet: let it learn
  config.model.frozen_image_encoder = False
  config.num_train_steps = config.optimizer.total_steps = 60
  split = fakes.cirr_like_split(num_sets=4, queries_per_set=8)
  fakes.use_split(monkeypatch, config, split)
  losses_, _, _, before, after = fakes.run_steps(config, split, devices=1, steps=60,
                                                 evaluate=True)
  assert losses_[-10:].mean() < losses_[:10].mean()
  score = lambda m: m["R@1"] + m["R@5"]
  assert score(after) > score(before) + 10, (before, after)
