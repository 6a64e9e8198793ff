"""Several seeds in one program (config.num_seeds, cir_jax/seeds.py): replica i of an
S-seed run is the single-seed run of seed i, on the host and the device data path."""
import jax
import numpy as np
import pytest

from cir_jax import experiment
from cir_jax import seeds
from cir_jax import train
from cir_jax.data import device_data
from cir_jax.data import pipeline
from cir_jax.data.vocab import Vocabulary
from tests import fakes

STEPS = 3


def _run(config, split, mesh, vocab, placement):
  """(per-step losses [steps, S] or [steps], final params) of `config` via the trainer's step."""
  exp = experiment.build(config, mesh, vocab)
  n = seeds.num_seeds(config)
  quiet = lambda *_: None
  if placement == "device":
    data = device_data.DeviceTrainData(split, vocab, 16, config.batch_size, mesh, config.seed,
                                       log=quiet)
    inputs = iter(lambda: data.tables, None)
  else:
    data = None
    pipes = [pipeline.TrainPipeline(split, vocab, 16, config.batch_size, mesh, s, 32, log=quiet)
             for s in seeds.seed_list(config)]
    inputs = (pipes[0] if n == 1 else seeds.StackedPipelines(pipes, mesh)).batches(0)
  step = train.make_train_step(exp.model, exp.tx, config.loss, mesh, data=data, num_seeds=n,
                               first_seed=config.seed)
  state, losses = exp.state, []
  for _ in range(STEPS):
    state, metrics = step(state, next(inputs))
    losses.append(np.asarray(metrics["loss"]))
  return np.asarray(losses), jax.device_get(state.params)


@pytest.mark.parametrize("placement", ["host", "device"])
def test_replica_i_equals_the_single_seed_run_of_seed_i(placement):
  split = fakes.random_split(num_images=16, num_queries=24)
  vocab = Vocabulary.build(split.texts)
  config = fakes.tiny_config("tirg", num_seeds=2, seed=4)
  mesh = experiment.make_mesh(config, jax.devices()[:2])
  losses, params = _run(config, split, mesh, vocab, placement)
  assert losses.shape == (STEPS, 2)
  assert not np.allclose(losses[:, 0], losses[:, 1])   # the replicas differ
  for i in range(2):
    single = fakes.tiny_config("tirg", seed=4 + i)
    single_losses, single_params = _run(single, split, mesh, vocab, placement)
    np.testing.assert_allclose(losses[:, i], single_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(seeds.replica(params, i)), jax.tree.leaves(single_params)):
      np.testing.assert_allclose(a, b, atol=1e-5)


def test_aggregate_reports_mean_std_and_each_seed():
  per_seed = [{"split": "s", "metrics": {"R@1": 10.0, "R@5": 50.0}},
              {"split": "s", "metrics": {"R@1": 20.0, "R@5": 60.0}},
              {"split": "s", "metrics": {"R@1": 30.0, "R@5": 40.0}}]
  out = seeds.aggregate(per_seed, [7, 8, 9])
  assert out["metrics"] == {"R@1": 20.0, "R@5": 50.0} and out["split"] == "s"
  assert out["metrics_std"]["R@1"] == pytest.approx(10.0)   # sample std (ddof=1)
  assert [r["seed"] for r in out["per_seed"]] == [7, 8, 9]
  logged, worst = seeds.host_scalars({"loss": np.array([1.0, 3.0]), "grad_norm": np.array([2., 4.])})
  assert logged["loss"] == 2.0 and logged["loss/seed1"] == 3.0 and worst["grad_norm"] == 4.0
  with pytest.raises(ValueError, match="num_seeds=0"):
    seeds.num_seeds(fakes.tiny_config(num_seeds=0))


def _css_config(steps, **overrides):
  return fakes.tiny_config("concat", **{
      "data.name": "css", "data.css_source": "numpy", "data.placement": "device",
      "data.num_scenes": 10, "data.num_queries": 24, "num_seeds": 2, "num_train_steps": steps,
      "eval_every_steps": 100, "checkpoint_every_steps": 2, "log_every_steps": 1, **overrides})


@pytest.mark.slow
def test_trainer_checkpoints_resumes_and_evaluates_every_replica(tmp_path):
  from cir_jax import evaluate  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(_css_config(2), str(tmp_path / "resumed"))
  resumed = train.train_and_evaluate(_css_config(4), str(tmp_path / "resumed"))
  assert "resumed from" in (tmp_path / "resumed" / "log.txt").read_text()
  straight = train.train_and_evaluate(_css_config(4), str(tmp_path / "straight"))
  assert resumed["step"] == straight["step"] == 4
  assert [r["seed"] for r in resumed["per_seed"]] == [0, 1]
  for a, b in zip(resumed["per_seed"], straight["per_seed"]):
    assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-6)
  assert set(resumed["metrics_std"]) == set(resumed["metrics"])
  rows = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
  assert "loss/seed1" in rows[0] and rows[0]["loss"] == pytest.approx(
      (rows[0]["loss/seed0"] + rows[0]["loss/seed1"]) / 2)
  # The evaluation command restores all replicas and reports the same numbers.
  again = evaluate.evaluate_workdir(_css_config(4), str(tmp_path / "straight"))
  assert again["metrics"] == pytest.approx(straight["metrics"], abs=1e-6)
