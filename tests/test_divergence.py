"""Divergence that stays finite: the rule on hand-worked numbers, the checkpoint rotation
that keeps the best step, and a resumed run at a huge learning rate that must stop
before it saves (issue 15: loss 0.42 -> 485, param_norm 87.6 -> 3.6M, good checkpoints
rotated away, exit 0)."""
import json
import pathlib
import shutil

import jax.numpy as jnp
import pytest

from cir_jax import checkpoint
from cir_jax import divergence
from cir_jax import train
from cir_jax.data import registry
from cir_jax.utils import logging as log_lib
from configs import common
from tests import fakes


def _config(**overrides):
  c = common.base_config().divergence
  c.update(overrides)
  return c


def _history(losses, norm=87.6):
  return [{"step": i + 1, "loss": loss, "param_norm": norm} for i, loss in enumerate(losses)]


HISTORY = _history([0.5, 0.40, 0.45, 0.42, 0.41])  # median 0.42


def test_loss_far_above_its_recent_median_stops():
  monitor = divergence.Monitor(_config(loss_floor=0.1), HISTORY, log=lambda _: None)
  monitor.check(6, {"loss": 4.19, "param_norm": 87.0}, "logging step")  # < 10 x 0.42
  # The median of (0.5, 0.4, 0.45, 0.42, 0.41, 4.19) is 0.435: the limit barely moves.
  with pytest.raises(divergence.DivergenceError,
                     match=r"at step 7 \(logging step\): loss 4.36 > 10 x 0.435, the median of "
                           r"the last 6 checked losses"):
    monitor.check(7, {"loss": 4.36, "param_norm": 87.0}, "logging step")


def test_param_norm_jump_stops_even_with_a_low_loss():
  monitor = divergence.Monitor(_config(), HISTORY, log=lambda _: None)
  monitor.check(6, {"loss": 0.1, "param_norm": 870.0}, "x")  # exactly 10x: allowed
  with pytest.raises(divergence.DivergenceError, match=r"param_norm 877 > 10 x 87.6"):
    monitor.check(7, {"loss": 0.1, "param_norm": 877.0}, "before saving a checkpoint")


def test_loss_floor_min_history_off_switch_and_repeated_steps():
  near_zero = _history([0.01] * 5)
  # max(median 0.01, floor 0.5) * 10 = 5: a rise to 4.9 is allowed, 5.1 is not.
  monitor = divergence.Monitor(_config(), near_zero, log=lambda _: None)
  monitor.check(6, {"loss": 4.9, "param_norm": 87.6}, "x")
  with pytest.raises(divergence.DivergenceError, match=r"loss 5.1 > 10 x 0.5 \(loss_floor"):
    monitor.check(7, {"loss": 5.1, "param_norm": 87.6}, "x")
  # Fewer than min_history earlier steps: nothing to compare with yet.
  divergence.Monitor(_config(), near_zero[:4]).check(5, {"loss": 1e9, "param_norm": 1e9}, "x")
  # Switched off: never stops, but the history (ranking checkpoints) is still kept.
  off = divergence.Monitor(_config(enabled=False), HISTORY)
  off.check(6, {"loss": 1e9, "param_norm": 1e9}, "x")
  assert len(off.values) == 6 and off.median_loss() == pytest.approx(0.435)
  # A step that is both logged and saved is one observation.
  monitor = divergence.Monitor(_config(), HISTORY)
  monitor.check(6, {"loss": 0.3, "param_norm": 87.6}, "logging step")
  monitor.check(6, {"loss": 0.3, "param_norm": 87.6}, "before saving a checkpoint")
  assert [v[0] for v in monitor.values] == [1, 2, 3, 4, 5, 6]
  # The window keeps the newest rows of the history only.
  assert len(divergence.Monitor(_config(window=3, min_history=2), HISTORY).values) == 3
  with pytest.raises(ValueError, match="min_history=5"):
    divergence.Monitor(_config(window=3))


def test_rotation_keeps_the_lowest_loss_checkpoint(tmp_path):
  manager = checkpoint.make_manager(tmp_path, 2)
  medians = {1: 1.0, 2: 0.5, 3: 0.3, 4: 2.0, 5: 5.0, 6: 9.0}
  for step, median in medians.items():
    checkpoint.save(manager, step, {"step": jnp.int32(step)},
                    {checkpoint.LOSS_METRIC: median})
    manager.wait_until_finished()
  manager.close()
  # The newest two, plus step 3: the last one before the loss started rising.
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 5, 6]


def test_resume_drops_replayed_rows_from_metrics_jsonl(tmp_path):
  rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)]
  text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo'  # torn by a kill
  (tmp_path / "metrics.jsonl").write_text(text)
  writer = log_lib.SummaryWriter(tmp_path, start_step=4)
  writer.scalars(5, {"loss": 0.5})
  writer.close()
  assert log_lib.read_metrics(tmp_path) == rows[:4] + [{"step": 5, "loss": 0.5}]
  assert log_lib.read_metrics(tmp_path, 2) == rows[:2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """6 steps on a random split, every step logged, checkpoints at 2, 4, 6 (keep 2)."""
  registry.LOADERS["random"] = lambda data_config, split, log: fakes.random_split(
      num_images=16, num_queries=16, name=f"random/{split}")
  workdir = tmp_path_factory.mktemp("divergence") / "run"
  train.train_and_evaluate(_train_config(num_train_steps=6), workdir)
  yield workdir
  del registry.LOADERS["random"]


def _train_config(**overrides):
  return fakes.tiny_config("concat", **{
      "data.name": "random", "data.max_text_len": 8, "eval.batch_size": 8,
      "log_every_steps": 1, "checkpoint_every_steps": 2, "keep_checkpoints": 2,
      "eval_every_steps": 100, **overrides})


def _steps(workdir):
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                if p.name.isdigit())


@pytest.mark.slow
def test_diverging_resume_stops_and_keeps_the_good_checkpoints(trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained, workdir)
  assert _steps(workdir) == [4, 6]
  # At lr 1e3 step 7's weights jump from norm ~20 to ~3e4 while the loss stays finite;
  # without the stop, steps 8 and 10 were saved and rotated 4 and 6 away.
  config = _train_config(num_train_steps=10, **{"optimizer.learning_rate": 1e3})
  with pytest.raises(divergence.DivergenceError, match=r"diverged at step 7 \(logging step\): "
                                                       r"param_norm .* > 10 x "):
    train.train_and_evaluate(config, workdir)
  assert _steps(workdir) == [4, 6]
  assert "training diverged at step 7" in (workdir / "log.txt").read_text()
  assert [r["step"] for r in log_lib.read_metrics(workdir) if "loss" in r] == [1, 2, 3, 4, 5, 6]
