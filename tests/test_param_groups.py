"""Freezing by regex and per-module learning-rate multipliers."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cir_jax import param_groups


def _params():
  return {"image_encoder": {"layers_0": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))}},
          "text_encoder": {"embeddings": {"embedding": jnp.ones((5, 4))},
                           "layers_0": {"kernel": jnp.ones((4, 4))}},
          "head": {"kernel": jnp.ones((4, 2))}}


def _grads(params):
  return jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)


def _step(tx, params, steps=2):
  state = tx.init(params)
  for _ in range(steps):
    updates, state = tx.update(_grads(params), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_frozen_params_do_not_change_and_keep_no_state():
  params = _params()
  tx = param_groups.freeze(optax.adamw(0.1, weight_decay=0.1), params,
                           [r"^image_encoder/", r"^text_encoder/embeddings/"])
  new, state = _step(tx, params)
  np.testing.assert_array_equal(new["image_encoder"]["layers_0"]["kernel"], np.ones((3, 4)))
  np.testing.assert_array_equal(new["image_encoder"]["layers_0"]["bias"], np.ones((4,)))
  np.testing.assert_array_equal(new["text_encoder"]["embeddings"]["embedding"], np.ones((5, 4)))
  assert float(np.abs(new["text_encoder"]["layers_0"]["kernel"] - 1).min()) > 0.05
  assert float(np.abs(new["head"]["kernel"] - 1).min()) > 0.05
  # Adam keeps moments only for the trainable arrays (2 of 5): mu and nu.
  moment_sizes = [x.size for x in jax.tree.leaves(state) if x.ndim > 0]
  assert sorted(moment_sizes) == sorted([16, 8] * 2)


def test_multipliers_scale_updates():
  params = _params()
  rules = [(r"^image_encoder/", 0.1), (r"^text_encoder/", 0.5), (r"encoder", 7.0)]
  tx = optax.chain(optax.sgd(1.0), param_groups.scale_by_multipliers(params, rules))
  updates, _ = tx.update(_grads(params), tx.init(params), params)
  # First matching rule wins; unmatched parameters get 1.
  np.testing.assert_allclose(updates["image_encoder"]["layers_0"]["kernel"], -0.05)
  np.testing.assert_allclose(updates["text_encoder"]["layers_0"]["kernel"], -0.25)
  np.testing.assert_allclose(updates["head"]["kernel"], -0.5)
  # Combined with freezing, under jit.
  tx = param_groups.freeze(tx, params, [r"^head/"])
  state = tx.init(params)
  updates, _ = jax.jit(tx.update)(_grads(params), state, params)
  np.testing.assert_allclose(updates["head"]["kernel"], 0.0)
  np.testing.assert_allclose(updates["image_encoder"]["layers_0"]["bias"], -0.05)


def test_patterns_that_match_nothing_fail():
  with pytest.raises(ValueError, match="'imgae_encoder' matches no parameter"):
    param_groups.freeze(optax.sgd(0.1), _params(), ["imgae_encoder"])
  with pytest.raises(ValueError, match="multiplier pattern"):
    param_groups.scale_by_multipliers(_params(), [("^nothing", 2.0)])


def test_summary_counts():
  report = param_groups.summary(_params(), [r"^image_encoder/"], [(r"^head/", 2.0)])
  assert "trainable: 3 arrays, 44 parameters" in report
  assert "frozen: 2 arrays, 16 parameters" in report
  assert "head/kernel x2" in report
  assert param_groups.param_paths(_params())[0] == "head/kernel"
