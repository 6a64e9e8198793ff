"""Cached features of frozen towers (cir_jax/feature_cache.py): the same losses, gradients and
trained parameters as running the towers every step, a keyed workdir cache that is never
silently wrong, and clear errors when 'on' cannot apply."""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cir_jax import experiment
from cir_jax import feature_cache
from cir_jax import losses
from cir_jax import train
from cir_jax.data import device_data
from cir_jax.data import feature_data
from cir_jax.data import pipeline
from cir_jax.models import build
from configs import combiner_cirr
from configs import common
from configs import ssn_fashioniq
from tests import fakes
from tests import pretrained_fakes

TOL = dict(atol=1e-5, rtol=1e-5)


def _abstract(config, split):
  """(model, abstract variables) of `config`: what `resolve` reads, without compiling."""
  model = build.build_model(config.model, len(fakes.make_vocab(config, split)),
                            config.data.image_size)
  example = experiment.example_batch(config)
  variables = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0), "dropout": jax.random.key(0)},
      {k: jnp.zeros(v.shape, v.dtype) for k, v in example.items()}))
  return model, {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _setup(config, split, devices=1):
  mesh = experiment.make_mesh(config, jax.devices()[:devices])
  vocab = fakes.make_vocab(config, split)
  return experiment.build(config, mesh, vocab), vocab


def _loss_and_grads(exp):
  """(batch, step) -> the train step's objective (cir_jax/train.py) and its gradients."""
  state, loss_config = exp.state, exp.config.loss
  loss_fn, spec = losses.get_loss(loss_config)

  def value_and_grad(batch, step):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), step)

    def objective(params):
      query, target, aux = exp.model.apply(
          {"params": params, "batch_stats": state.batch_stats}, batch, train=True,
          rngs={"dropout": rng}, mutable=["batch_stats"])[0]
      per_query = {k: aux[k] for k in spec.query_inputs if k in aux}
      kw = {"rng": jax.random.fold_in(rng, 1)} if spec.takes_rng else {}
      return losses.global_batch_loss(loss_fn, query, target, exp.mesh,
                                      negatives=loss_config.negatives, per_query=per_query, **kw)
    return jax.value_and_grad(objective)(state.params)
  return jax.jit(value_and_grad)


@pytest.mark.parametrize("name", ["combiner", pytest.param("resnet_tirg", marks=pytest.mark.slow)])
def test_loss_and_gradients_equal_the_on_the_fly_path(name):
  # Combiner stage 2: both CLIP towers frozen and cached ('projected'). TIRG on a frozen
  # ResNet (its batch statistics) cached, the LSTM trained on the fly, CIRR set negatives
  # gathered from the cached table.
  config = (combiner_cirr.get_config("tiny") if name == "combiner" else fakes.tiny_config(
      "tirg", **{"model.image_encoder": "hf_resnet_tiny", "model.frozen_image_encoder": True,
                 "optimizer.freeze": ("^image_encoder/",), "loss.set_negatives": 2}))
  split = pretrained_fakes.cirr_like_split(num_sets=3)
  exp, vocab = _setup(config, split)
  plan = feature_cache.resolve(config, exp.model, exp.variables, log=lambda *_: None)
  assert plan is not None and plan.text == (name == "combiner")
  pixels = device_data.DeviceTrainData(split, vocab, config.data.max_text_len, config.batch_size,
                                       exp.mesh, config.seed, log=lambda *_: None,
                                       set_negatives=config.loss.set_negatives)
  cached = feature_cache.build_train_data(plan, exp, split, vocab, None, log=lambda *_: None)
  assert isinstance(cached, feature_data.FeatureTrainData)
  assert "ref_image" not in jax.eval_shape(cached.batch, cached.tables, 0)
  trainable = "composer"
  grads_of = _loss_and_grads(exp)
  for step in (0, 3):
    loss_px, grads_px = grads_of(pixels.batch(pixels.tables, step), step)
    loss_ft, grads_ft = grads_of(cached.batch(cached.tables, step), step)
    np.testing.assert_allclose(loss_ft, loss_px, **TOL)
    leaves_px = jax.tree_util.tree_leaves_with_path(grads_px[trainable])
    leaves_ft = jax.tree.leaves(grads_ft[trainable])
    for (path, a), b in zip(leaves_px, leaves_ft):
      np.testing.assert_allclose(b, a, err_msg=jax.tree_util.keystr(path), **TOL)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_px[trainable])) > 0
    for tower in ("image_encoder",) + (("text_encoder",) if plan.text else ()):
      assert all(not np.any(g) for g in jax.tree.leaves(grads_px[tower]))


def test_trainer_steps_equal_the_on_the_fly_path_device_and_host(tmp_path):
  # Caption groups (FashionIQ's forms): one member per group per epoch, drawn in the step.
  config = combiner_cirr.get_config("tiny")
  # SGD: Adam turns float noise on near-zero gradients into +-lr steps (pretrained_fakes).
  config.optimizer.name, config.optimizer.learning_rate = "sgd", 0.1
  split = pretrained_fakes.cirr_like_split(num_sets=4, queries_per_set=4)
  split.query_groups = np.arange(split.num_queries) // 2
  exp, vocab = _setup(config, split, devices=2)
  plan = feature_cache.resolve(config, exp.model, exp.variables, log=lambda *_: None)
  init = jax.device_get(exp.state)
  shardings = jax.tree.map(lambda x: x.sharding, exp.state)
  reference = pipeline.TrainPipeline(split, vocab, config.data.max_text_len, config.batch_size,
                                     exp.mesh, config.seed, config.data.image_size)
  runs = {"on the fly": (None, reference.batches(0))}
  for placement in ("device", "host"):
    data = feature_cache.build_train_data(plan, exp, split, vocab, str(tmp_path),
                                          log=lambda *_: None, placement=placement)
    runs[placement] = ((data, iter(lambda d=data: d.tables, None)) if placement == "device"
                       else (None, data.batches(0)))
  params = {}
  for name, (data, inputs) in runs.items():
    step = train.make_train_step(exp.model, exp.tx, config.loss, exp.mesh, data=data)
    state = jax.device_put(init, shardings)
    for _ in range(3):
      state, metrics = step(state, next(inputs))
    params[name] = jax.device_get(state.params)
  moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), params["on the fly"], init.params)
  assert max(jax.tree.leaves(moved["composer"])) > 1e-4
  for name in ("device", "host"):
    for a, b in zip(jax.tree.leaves(params["on the fly"]), jax.tree.leaves(params[name])):
      np.testing.assert_allclose(b, a, **TOL)
  runs["on the fly"][1].close()


def test_workdir_cache_is_keyed_and_never_silently_wrong(tmp_path):
  config = combiner_cirr.get_config("tiny")
  split = pretrained_fakes.cirr_like_split(num_sets=2)
  exp, vocab = _setup(config, split)
  quiet = lambda *_: None
  plan = feature_cache.resolve(config, exp.model, exp.variables, log=quiet)
  variables = {"params": exp.state.params, "batch_stats": exp.state.batch_stats}
  table = feature_cache.tables_of(plan, config, exp.model, variables, split)[0]
  assert (table.name, table.attr) == ("images", "image_encoder")
  key = feature_cache.cache_key(config, variables, table, split)
  assert feature_cache.cache_key(config, variables, table, split) == key
  # The frozen weights, the preprocessing and the image size are in the key; the
  # trained composer is not.
  bumped = jax.tree.map(lambda x: x, variables)
  bumped["params"]["image_encoder"] = jax.tree.map(lambda x: x + 1e-3,
                                                   variables["params"]["image_encoder"])
  assert feature_cache.cache_key(config, bumped, table, split) != key
  composer = jax.tree.map(lambda x: x, variables)
  composer["params"]["composer"] = jax.tree.map(lambda x: x + 1, variables["params"]["composer"])
  assert feature_cache.cache_key(config, composer, table, split) == key
  for field, value in (("preprocess", "clip"), ("image_size", 64), ("target_pad_ratio", 1.5)):
    other = config.copy_and_resolve_references()
    other.data[field] = value
    assert feature_cache.cache_key(other, variables, table, split) != key, field

  logs = []
  build = lambda: feature_cache.build_train_data(plan, exp, split, vocab, str(tmp_path),
                                                 log=logs.append, placement="host")
  first = jax.tree.map(np.array, build().tables["features"])
  directory = feature_cache.cache_dir(tmp_path, table, key)
  assert (directory / "projected.npy").exists()
  logs.clear()
  build()
  assert any(f"reusing {directory}" in line for line in logs), logs
  # A flipped byte: the checksum catches it, the features are recomputed.
  path = directory / "projected.npy"
  raw = bytearray(path.read_bytes())
  raw[-3] ^= 0xFF
  path.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="checksum mismatch"):
    feature_cache.load_cached(directory, table, key)
  logs.clear()
  again = jax.tree.map(np.array, build().tables["features"])
  assert any("checksum mismatch" in line and "recomputing" in line for line in logs), logs
  jax.tree.map(np.testing.assert_array_equal, again, first)
  # Another key's directory name cannot be taken for this one either.
  with pytest.raises(ValueError, match="expected"):
    feature_cache.load_cached(directory, table, "0" * 64)


def test_on_names_the_field_when_it_cannot_apply():
  quiet = lambda *_: None

  def check(config, match):
    config.data.cache_frozen_features = "on"
    model, variables = _abstract(config, pretrained_fakes.cirr_like_split(num_sets=2))
    with pytest.raises(ValueError, match=match) as info:
      feature_cache.resolve(config, model, variables, log=quiet)
    assert "data.cache_frozen_features='on'" in str(info.value)

  unfrozen = combiner_cirr.get_config("tiny")
  unfrozen.model.frozen_image_encoder = False
  check(unfrozen, "frozen_image_encoder is False")
  updated = combiner_cirr.get_config("tiny")
  updated.optimizer.freeze = ("^text_encoder/",)
  check(updated, "optimizer.freeze does not cover")
  # SSN on FashionIQ fixes its image tower only after freeze_after_steps: never cached.
  check(ssn_fashioniq.get_config("tiny"), "trains until optimizer.freeze_after_steps")
  seeds = combiner_cirr.get_config("tiny")
  seeds.num_seeds = 2
  check(seeds, "num_seeds=2")
  bad = combiner_cirr.get_config("tiny")
  bad.data.cache_frozen_features = "yes"
  with pytest.raises(ValueError, match="data.cache_frozen_features='yes'"):
    feature_cache.mode(bad)


def test_auto_logs_why_not_and_frozen_bert_with_dropout_is_not_cached():
  logs = []
  config = ssn_fashioniq.get_config("tiny")
  split = pretrained_fakes.cirr_like_split(num_sets=2)
  assert feature_cache.resolve(config, *_abstract(config, split), log=logs.append) is None
  assert any("freeze_after" in line and "on the fly" in line for line in logs), logs
  # A frozen BERT keeps its dropout in training: its text features would not be exact.
  config = fakes.tiny_config("tirg", **{
      "model.image_encoder": "hf_resnet_tiny", "model.text_encoder": "bert_tiny",
      "model.frozen_image_encoder": True, "model.frozen_text_encoder": True,
      "optimizer.freeze": ("^image_encoder/", "^text_encoder/")})
  logs.clear()
  plan = feature_cache.resolve(config, *_abstract(config, split), log=logs.append)
  assert plan is not None and not plan.text
  assert any("text tower runs on the fly" in line and "dropout" in line for line in logs), logs
  assert common.base_config().data.cache_frozen_features == "auto"


@pytest.mark.slow  # two short trainer runs with evaluation
def test_trainer_keeps_large_features_in_the_workdir_and_reuses_them_on_resume(monkeypatch,
                                                                               tmp_path):
  config = combiner_cirr.get_config("tiny")
  config.data.cache_frozen_features = "on"
  config.data.device_memory_fraction = 0.0   # "too large for the device": the workdir path
  config.eval.ks = (1, 5, 10)
  split = pretrained_fakes.cirr_like_split(num_sets=3)
  pretrained_fakes.use_split(monkeypatch, config, split)
  train.train_and_evaluate(config, tmp_path)
  log = (tmp_path / "log.txt").read_text()
  assert "exceed data.device_memory_fraction" in log and "wrote" in log, log
  written = sorted(p.name for p in (tmp_path / feature_cache.CACHE_DIR).iterdir())
  assert [n.split("-")[0] for n in written] == ["images", "texts"]
  config.num_train_steps = 2
  results = train.train_and_evaluate(config, tmp_path)
  assert results["step"] == 2
  log = (tmp_path / "log.txt").read_text().split("resumed from")[-1]
  assert log.count("reusing") == 2 and "computed with" not in log, log
  assert sorted(p.name for p in (tmp_path / feature_cache.CACHE_DIR).iterdir()) == written


@pytest.mark.slow  # compiles both train steps (~5 s quiet); CI runs it
def test_benchmark_tool_runs(capsys):
  """tools/benchmark_cached_features.py end to end at tiny sizes (no timing assertion)."""
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))
  import benchmark_cached_features  # pylint: disable=g-import-not-at-top
  out = benchmark_cached_features.main(["--batch", "8", "--images", "16", "--steps", "1",
                                        "--rounds", "1"])
  assert set(out) == {"on the fly", "cached", "ratio", "feature s"}
  assert "cached / on the fly" in capsys.readouterr().out
