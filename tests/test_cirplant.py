"""CIRPLANT: the image token in BERT, the shared FC + L2 target space, the fixed ResNet,
the HF-tokenizer switch, sharded == single device, the config, and learning."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cir_jax import experiment
from cir_jax import losses
from cir_jax import train
from cir_jax.data import pipeline
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


def _with_soft_positives(split, seed=0):
  """`split` with one more member per query graded a partial match (as CIRR's 0.5/0.2)."""
  rng = np.random.default_rng(seed)
  soft = np.full(split.candidates.shape, -1, np.int64)
  for i, row in enumerate(split.candidates):
    others = [c for c in row if c >= 0 and c != split.target_index[i]]
    soft[i, :2] = sorted([split.target_index[i], rng.choice(others)])
  return dataclasses.replace(split, soft_positives=soft).validate()


def test_paper_config_never_uses_an_image_set_member_as_a_negative(monkeypatch, tmp_path):
  """CIRPLANT's paper and code: set members are positives only; negatives come from the batch."""
  config = cirplant_cirr.get_config("tiny")
  assert config.loss.set_negatives == 0 and config.loss.name == "soft_triplet"
  assert "set_negative_images" not in experiment.example_batch(config)
  split = _with_soft_positives(fakes.cirr_like_split(num_sets=3, queries_per_set=4))
  fakes.use_split(monkeypatch, config, split)
  config.data.cache_frozen_features = "off"  # the pixel pipeline's batch is inspected here
  exp, data = experiment.setup_training(config, tmp_path, log=lambda _: None)
  batch = next(data.dataset(0).as_numpy_iterator())
  assert sorted(batch) == ["ref_image", "target_image", "text_ids", "text_mask"]
  # The step's loss is TIRG Eq. 5 over the batch's own targets: the same number
  # whatever the (absent) set members look like.
  variables = {"params": exp.state.params, **({"batch_stats": exp.state.batch_stats}
                                             if getattr(exp.state, "batch_stats", None) else {})}
  query, target, aux = exp.model.apply(variables, batch)
  assert "set_negatives" not in aux
  loss_fn = losses.get_loss_fn(config.loss)
  expected = losses.soft_triplet_loss(query, target, jnp.arange(len(query)), kernel="neg_sq_l2")
  np.testing.assert_allclose(loss_fn(query, target, jnp.arange(len(query))), expected, rtol=1e-6)


def test_set_negatives_extension_skips_reference_target_and_soft_positives():
  """Our opt-in extension: members with a soft target > 0 are never negatives."""
  config = cirplant_cirr.get_config("tiny,set_negatives=4")
  assert config.loss.set_negatives == 4
  split = _with_soft_positives(fakes.cirr_like_split(num_sets=3, queries_per_set=4))
  rows = pipeline.set_negative_rows(split, config.loss.set_negatives)
  for i, row in enumerate(rows):
    used = set(row[row >= 0].tolist())
    positives = set(split.soft_positives[i][split.soft_positives[i] >= 0].tolist())
    assert split.target_index[i] in positives and len(positives) == 2
    assert not used & positives and split.ref_index[i] not in used
    members = set(split.candidates[i][split.candidates[i] >= 0].tolist())
    assert used == members - positives  # 5 members - 2 soft positives = 3 negatives
  with pytest.raises(ValueError, match="token_norm='bad'"):
    bad = cirplant_cirr.get_config("tiny,token_norm=bad")
    fakes.build.build_model(bad.model, 20).init(
        {"params": jax.random.key(0), "dropout": jax.random.key(1)}, BATCH)


def test_image_token_is_the_fc_output_as_in_the_authors_code():
  """token_norm='none' (the paper config, the authors' code): the token is FC(pooled);
  'l2' (the paper's text) is its unit-norm version."""
  config = cirplant_cirr.get_config("tiny")
  assert config.model.composer_kwargs.token_norm == "none"
  variables = None
  tokens = {}
  for norm in ("none", "l2"):
    config.model.composer_kwargs.token_norm = norm
    model = fakes.build.build_model(config.model, 20)
    if variables is None:
      variables = jax.jit(model.init)({"params": jax.random.key(0),
                                       "dropout": jax.random.key(1)}, BATCH)

    def f(m, images):
      pixels = ((images.astype(jnp.float32) / 255 - jnp.asarray(m.image_encoder.pixel_mean))
                / jnp.asarray(m.image_encoder.pixel_std))
      return m.composer.image_tokens(m.image_encoder(pixels))[:, 0], m.image_encoder(pixels)

    tokens[norm], pooled = model.apply(variables, BATCH["ref_image"], method=f)
  fc = variables["params"]["composer"]["image_fc"]
  raw = pooled["pooled"] @ fc["kernel"] + fc["bias"]
  np.testing.assert_allclose(tokens["none"], raw, atol=1e-5)
  np.testing.assert_allclose(tokens["l2"], raw / np.linalg.norm(raw, axis=1, keepdims=True),
                             atol=1e-6)
  assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-2)


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
