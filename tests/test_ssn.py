"""SSN: shapes and gradients, the decompose/compose structure, Eq. 7-9 against NumPy,
sharded == single device, the step-scheduled image-encoder freeze, and learning."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cir_jax import losses
from cir_jax import optim
from cir_jax import param_groups
from cir_jax import train
from configs import ssn_cirr
from configs import ssn_fashioniq
from tests import pretrained_fakes as fakes

BATCH = {"ref_image": jnp.asarray(np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3)),
                                  jnp.uint8),
         "target_image": jnp.asarray(np.random.default_rng(1).integers(0, 255, (4, 32, 32, 3)),
                                     jnp.uint8),
         "text_ids": jnp.asarray(np.random.default_rng(2).integers(2, 20, (4, 16)), jnp.int32),
         "text_mask": jnp.asarray(np.arange(16)[None] < np.array([[3], [5], [16], [8]]))}


def _build(**composer_kwargs):
  """(config, model) of the tiny SSN CIRR config with `composer_kwargs`."""
  config = ssn_cirr.get_config("tiny")
  config.model.composer_kwargs.update(composer_kwargs)
  return config, fakes.build.build_model(config.model, 20)


INIT_RNGS = {"params": jax.random.key(0), "dropout": jax.random.key(1)}


@functools.cache
def _model():
  """(config, model, variables) of the default tiny SSN, initialised once per module."""
  config, model = _build()
  return config, model, jax.jit(model.init)(INIT_RNGS, BATCH)


def _param_shapes(**composer_kwargs):
  """The parameter tree of a variant, traced (no compile)."""
  _, model = _build(**composer_kwargs)
  return jax.eval_shape(model.init, INIT_RNGS, BATCH)["params"]


def test_shapes_branches_and_gradients():
  config, model, variables = _model()
  (query, target, aux) = jax.jit(model.apply)(variables, BATCH)
  assert query.shape == target.shape == aux["negative_query"].shape == (4, 32)
  np.testing.assert_allclose(np.linalg.norm(query, axis=1), 1.0, rtol=1e-5)  # fixed scale 1
  assert "norm_scale" not in variables["params"]  # learn_scale=False: no double scaling
  assert aux["text_weights"].shape == (4, 16) and aux["image_weights"].shape == (4, 17)
  assert not np.allclose(query, aux["negative_query"], atol=1e-4)
  composer = variables["params"]["composer"]
  assert {"text_decompose", "image_decompose", "modality_embeddings", "fusion",
          "image_token_proj", "output_layer"} <= set(composer)

  def loss(params):
    q, t, a = model.apply({"params": params}, BATCH, train=True,
                          rngs={"dropout": jax.random.key(3)})
    return losses.ssn_loss(q, t, jnp.arange(4), a["negative_query"], config.loss.temperature,
                           config.loss.kl_weight)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  for path in ("composer/text_decompose", "composer/image_decompose", "composer/fusion",
               "composer/modality_embeddings", "image_encoder/encoder", "text_encoder/encoder"):
    node = grads
    for key in path.split("/"):
      node = node[key]
    assert optax.global_norm(node) > 0, path


def test_query_ignores_padding_and_target_ignores_text():
  _, model, variables = _model()
  apply = jax.jit(model.apply)
  q1, t1, _ = apply(variables, BATCH)
  ids = BATCH["text_ids"].at[0, 5:].set(7)  # change only padded positions of query 0
  q2, t2, _ = apply(variables, dict(BATCH, text_ids=ids))
  np.testing.assert_allclose(q2[0], q1[0], atol=1e-5)
  np.testing.assert_allclose(t2, t1)
  # The target passes through the fusion layer (without text): its weights matter.
  params = jax.tree.map(lambda x: x, variables["params"])
  # (a per-feature change: a constant shift would vanish in the post-LayerNorm)
  params["composer"]["fusion"]["linear2"]["bias"] = params["composer"]["fusion"]["linear2"][
      "bias"] + jnp.linspace(-1.0, 1.0, 32)
  _, t3, _ = apply({"params": params}, BATCH)
  assert not np.allclose(t3, t1, atol=1e-5)


def _with_gates(params, text=None, image=None):
  """Params whose decompose layers output sigmoid(bias) for every token (kernel 0)."""
  params = jax.tree.map(lambda x: x, params)
  for layer, bias in (("text_decompose", text), ("image_decompose", image)):
    if bias is not None:
      p = params["composer"][layer]
      p["kernel"], p["bias"] = jnp.zeros_like(p["kernel"]), jnp.full_like(p["bias"], bias)
  return params


def test_table3_variants_use_what_their_rows_say():
  # Table 3: full = (V+, T+); prototype_text = (V+, T); image_positive_text = (V, T+);
  # no_decompose = (V, T). Each variant is applied with the full model's params.
  _, full, variables = _model()
  models = {v: _build(variant=v)[1] for v in ("no_decompose", "prototype_text",
                                               "image_positive_text")}
  models["full"] = full
  applies = {v: jax.jit(m.apply) for v, m in models.items()}  # one compile per variant

  def queries(params):
    return {v: apply({"params": params}, BATCH)[0] for v, apply in applies.items()}

  base = variables["params"]
  close = lambda a, b: np.allclose(a, b, atol=1e-5)
  # T+ = T when the text gate is open (s_t = 1): full == prototype_text; closed: they differ.
  q = queries(_with_gates(base, text=40.0))
  assert close(q["full"], q["prototype_text"])
  q = queries(_with_gates(base, text=-40.0))
  assert not close(q["full"], q["prototype_text"])
  # V+ = V when the image gate is open (s_v = 1): full == image_positive_text.
  q = queries(_with_gates(base, image=40.0))
  assert close(q["full"], q["image_positive_text"])
  assert not close(queries(_with_gates(base, image=-40.0))["full"], q["full"])
  # Both open: full == no_decompose; and the variants that use V or T ignore that gate.
  q = queries(_with_gates(base, text=40.0, image=40.0))
  assert close(q["full"], q["no_decompose"])
  moved_image = queries(_with_gates(base, image=-3.0))
  moved_both = queries(_with_gates(base, text=-3.0, image=-3.0))
  plain = queries(base)
  assert close(moved_image["image_positive_text"], plain["image_positive_text"])
  assert close(moved_both["no_decompose"], plain["no_decompose"])
  assert not close(moved_image["full"], plain["full"])
  # Only the decomposing variants have the negative branch (and so the KL term).
  for variant, apply in applies.items():
    _, _, aux = apply({"params": base}, BATCH)
    assert ("negative_query" in aux) == (variant != "no_decompose"), variant


def test_shared_decompose_has_one_layer_and_bad_variant_fails():
  composer = _param_shapes(share_decompose=True)["composer"]
  assert "text_decompose" in composer and "image_decompose" not in composer
  with pytest.raises(ValueError, match="unknown SSN variant 'bogus'"):
    _param_shapes(variant="bogus")


def _log_softmax(x):
  x = x - x.max(1, keepdims=True)
  return x - np.log(np.exp(x).sum(1, keepdims=True))


def test_ssn_loss_matches_numpy_reference():
  rng = np.random.default_rng(0)
  q, neg, c = (rng.normal(size=(5, 8)) for _ in range(3))
  pos = np.array([0, 2, 1, 4, 3])
  tau, lam = 0.1, 0.7
  lp = _log_softmax(q @ c.T / tau)
  ln = _log_softmax(neg @ c.T / tau)
  ce = -lp[np.arange(5), pos].mean()                        # Eq. 7
  kl = (np.exp(lp) * (lp - ln)).sum(1).mean()               # Eq. 8: KL(P+ || P-)
  expected = ce - lam * kl                                  # Eq. 9
  got = losses.ssn_loss(jnp.asarray(q, jnp.float32), jnp.asarray(c, jnp.float32), jnp.asarray(pos),
                        jnp.asarray(neg, jnp.float32), tau, lam)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  ce_only = losses.ssn_loss(jnp.asarray(q, jnp.float32), jnp.asarray(c, jnp.float32),
                            jnp.asarray(pos), None, tau, lam)
  np.testing.assert_allclose(ce_only, ce, rtol=1e-5)


def test_sharded_step_equals_single_device():
  fakes.assert_sharded_equals_single(ssn_cirr.get_config("tiny"))


def test_fashioniq_freezes_the_image_encoder_after_one_epoch():
  config = ssn_fashioniq.get_config("tiny")
  assert ssn_fashioniq.get_config().optimizer.freeze_after_steps == 18_000 // 128
  config.optimizer.freeze_after_steps = 2
  params = {"image_encoder": {"w": jnp.ones(3)}, "composer": {"w": jnp.ones(3)}}
  tx = optim.make_optimizer(config.optimizer, params)
  state = tx.init(params)
  history = []
  for _ in range(4):
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    params = optax.apply_updates(params, updates)
    history.append(jax.tree.map(np.asarray, params))
  image = [h["image_encoder"]["w"][0] for h in history]
  head = [h["composer"]["w"][0] for h in history]
  assert image[0] != image[1] and image[1] == image[2] == image[3]   # fixed from step 2 on
  assert len(set(head)) == 4                                         # the rest keeps training
  with pytest.raises(ValueError, match="matches no parameter"):
    optim.make_optimizer(config.optimizer, {"composer": {"w": jnp.ones(3)}})
  assert param_groups.param_paths(params) == ["composer/w", "image_encoder/w"]


@pytest.mark.parametrize("module", [ssn_cirr, ssn_fashioniq])
def test_config_runs_one_step_and_one_eval(module, monkeypatch, tmp_path):
  config = module.get_config("tiny")
  full = module.get_config()
  assert (full.optimizer.learning_rate, full.batch_size, full.model.image_encoder) == (
      5e-5, 128, "clip_vit_b32")
  assert full.num_train_steps == 50 * (full.optimizer.decay_steps[0] // 10)
  split = fakes.cirr_like_split(num_sets=9, queries_per_set=1)  # 54 images: R@50 defined
  fakes.use_split(monkeypatch, config, split)
  results = train.train_and_evaluate(config, tmp_path)
  fakes.assert_protocol_results(results, config, split)


@pytest.mark.slow
def test_training_improves_recall_over_untrained(monkeypatch):
  config = ssn_cirr.get_config("tiny")
  config.eval.ks = (1, 5, 10)  # the 24-image generated gallery has no R@50
  config.optimizer.learning_rate = 1e-3
  split = fakes.cirr_like_split(num_sets=4, queries_per_set=8)
  fakes.use_split(monkeypatch, config, split)
  losses_, _, _, before, after = fakes.run_steps(config, split, devices=1, steps=60,
                                                 evaluate=True)
  assert losses_[-10:].mean() < losses_[:10].mean()
  score = lambda m: m["R@1"] + m["R@5"]
  assert score(after) > score(before) + 10, (before, after)
