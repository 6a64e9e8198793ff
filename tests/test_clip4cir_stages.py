"""CLIP4Cir's two stages: stage 1 fine-tunes the CLIP towers with the element-wise sum;
stage 2 (the Combiner, towers frozen) starts from a stage-1 workdir via `init_from`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cir_jax import checkpoint
from cir_jax import experiment
from configs import combiner_cirr
from configs import combiner_fashioniq
from configs import combiner_stage1_cirr
from configs import combiner_stage1_fashioniq
from tests import fakes

RNG = np.random.default_rng(0)
BATCH = {"ref_image": jnp.asarray(RNG.integers(0, 255, (4, 32, 32, 3)), jnp.uint8),
         "target_image": jnp.asarray(RNG.integers(0, 255, (4, 32, 32, 3)), jnp.uint8),
         "text_ids": jnp.asarray(RNG.integers(2, 20, (4, 16)), jnp.int32),
         "text_mask": jnp.ones((4, 16), bool)}
QUIET = lambda *_: None


def _build(config):
  return experiment.build(config, experiment.make_mesh(config), vocab=range(20))


def test_stage1_is_the_normalised_sum_and_trains_both_towers():
  config = combiner_stage1_cirr.get_config("tiny")
  assert config.optimizer.freeze == () and not config.model.frozen_image_encoder
  assert (config.batch_size, config.optimizer.learning_rate) == (8, 2e-6)  # tiny batch
  exp = _build(config)
  model, params = exp.model, exp.state.params
  assert "composer" not in params  # the sum has no parameters

  @jax.jit  # one program: applied op by op, the towers dispatch (and compile) every op
  def outputs(params):
    query, _, _ = model.apply({"params": params}, BATCH)
    img = model.apply({"params": params}, BATCH["ref_image"], method=model.encode_target)
    raw_txt = model.apply({"params": params}, BATCH["text_ids"], BATCH["text_mask"],
                          method=lambda m, i, k: m.text_encoder(i, k)["projected"])
    raw_img = model.apply({"params": params}, BATCH["ref_image"], method=lambda m, x: (
        m.image_encoder((x.astype(jnp.float32) / 255 - jnp.asarray(m.image_encoder.pixel_mean))
                        / jnp.asarray(m.image_encoder.pixel_std))["projected"]))
    return query, img, raw_txt, raw_img

  query, img, raw_txt, raw_img = outputs(params)
  mix = raw_img + raw_txt
  np.testing.assert_allclose(query, mix / np.linalg.norm(mix, axis=1, keepdims=True), atol=1e-5)
  np.testing.assert_allclose(img, raw_img / np.linalg.norm(raw_img, axis=1, keepdims=True),
                             atol=1e-5)

  def loss(p):
    q, t, _ = model.apply({"params": p}, BATCH, train=True, rngs={"dropout": jax.random.key(0)})
    return -jnp.mean(jax.nn.log_softmax(100 * q @ t.T)[jnp.arange(4), jnp.arange(4)])

  grads = jax.jit(jax.grad(loss))(params)
  for tower in ("image_encoder", "text_encoder"):
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[tower])) > 0, tower


def _stage1_workdir(tmp_path):
  """A stage-1 workdir whose towers differ from any fresh initialisation."""
  exp = _build(combiner_stage1_cirr.get_config("tiny"))
  params = jax.tree.map(lambda x: x + 0.01 * jnp.sign(x) + 0.003, exp.state.params)
  state = exp.state.replace(params=params)
  manager = checkpoint.make_manager(tmp_path / "stage1", 1)
  checkpoint.save(manager, 7, state)
  manager.wait_until_finished()
  manager.close()
  return tmp_path / "stage1", jax.device_get(params)


@pytest.mark.slow  # builds three tiny CLIP models (~1-2 min on 2 shared cores)
def test_stage2_starts_from_the_stage1_towers(tmp_path):
  workdir, stage1 = _stage1_workdir(tmp_path)
  for module in (combiner_cirr, combiner_fashioniq):
    config = module.get_config("tiny")
    assert config.model.composer == "combiner" and config.model.frozen_image_encoder
    config.init_from = str(workdir)
    exp = _build(config)
    fresh = jax.device_get(exp.state.params)
    logs = []
    state = experiment.restore_or_init(exp, checkpoint.make_manager(tmp_path / module.__name__, 1),
                                       logs.append).state
    params = jax.device_get(state.params)
    assert int(state.step) == 0
    for tower in ("image_encoder", "text_encoder"):
      for a, b in zip(jax.tree.leaves(params[tower]), jax.tree.leaves(stage1[tower])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(params["composer"]), jax.tree.leaves(fresh["composer"])):
      np.testing.assert_array_equal(a, b)
    assert any("step 7" in line for line in logs)


@pytest.mark.slow
def test_init_from_a_workdir_of_another_model_names_the_tower(tmp_path):
  config = fakes.tiny_config("tirg")
  exp = _build(config)
  manager = checkpoint.make_manager(tmp_path / "tirg", 1)
  checkpoint.save(manager, 1, exp.state)
  manager.wait_until_finished()
  manager.close()
  config = combiner_cirr.get_config("tiny")
  config.init_from = str(tmp_path / "tirg")
  stage2 = _build(config)
  with pytest.raises(ValueError, match="image_encoder"):
    experiment.restore_or_init(stage2, checkpoint.make_manager(tmp_path / "run", 1), QUIET)


def test_fashioniq_stage1_config():
  c = combiner_stage1_fashioniq.get_config()
  assert (c.data.name, c.data.caption_join, c.model.composer) == (
      "fashioniq", "random_forms", "clip4cir_sum")
  assert c.data.preprocess == "targetpad" and c.batch_size == 128
  assert c.num_train_steps == 100 * (18_000 // 128)
