"""Preemption safety, end to end: `python -m cir_jax.train` as a subprocess.

* SIGKILL after the first checkpoint, restart: results.json and every logged
  loss equal those of an uninterrupted run (params, optimiser, RNG and data
  position all restored).
* SIGTERM: the run saves a checkpoint at the step it reached and exits with
  preemption.EXIT_PREEMPTED (75), not 0 (finished) nor 1 (failed).
* A half-written newest checkpoint is skipped with a warning, never loaded.
* A NaN run raises FloatingPointError before writing any checkpoint.

The subprocesses share a persistent XLA compilation cache, so only the first
run pays for compiling. Tiny CSS (32 px, 20 scenes, 50 queries) is built once.
"""
import json
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cir_jax import checkpoint
from cir_jax import preemption
from cir_jax import train
from cir_jax.data import registry
from tests import fakes
from tests import train_subprocess as ts

STEPS = ts.REFERENCE_STEPS


@pytest.fixture(scope="module")
def env(tiny_css_run):
  return tiny_css_run[0]


def _wait_for_checkpoint(process, workdir, timeout=600):
  """Polls until a finished step directory exists; returns its step."""
  directory = pathlib.Path(workdir) / "checkpoints"
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert process.poll() is None, f"run ended before a checkpoint:\n{ts.output(workdir)}"
    done = [int(p.name) for p in directory.glob("[0-9]*")
            if p.name.isdigit() and (p / "commit_success.txt").exists()]
    if done:
      return min(done)
    time.sleep(0.05)
  raise TimeoutError(f"no checkpoint after {timeout}s:\n{ts.output(workdir)}")


def _losses(workdir) -> dict[int, list[float]]:
  """{step: [loss of every time the step was logged]} from metrics.jsonl."""
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "loss" in record:
      out.setdefault(record["step"], []).append(record["loss"])
  return out


def _metrics(workdir):
  results = json.loads((pathlib.Path(workdir) / "results.json").read_text())
  return results["step"], results["metrics"]


@pytest.fixture(scope="module")
def reference(tiny_css_run):
  """The session's uninterrupted run (it also filled the compilation cache)."""
  return tiny_css_run[1]


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(env, reference):
  workdir = env["root"] / "killed"
  process = ts.start(env, workdir)
  first = _wait_for_checkpoint(process, workdir)
  process.send_signal(signal.SIGKILL)
  assert process.wait(60) == -signal.SIGKILL
  assert not (workdir / "results.json").exists()  # really interrupted
  ts.run(env, workdir)
  log = (workdir / "log.txt").read_text()
  resumed = [line for line in log.splitlines() if "resumed from" in line]
  assert resumed, log
  resumed_step = int(resumed[0].rsplit("step", 1)[1])
  assert first <= resumed_step < STEPS
  assert _metrics(workdir) == _metrics(reference)
  expected, got = _losses(reference), _losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  # Steps trained again after the resume replace their rows from before the kill.
  assert got == {step: [losses[0]] for step, losses in expected.items()}


@pytest.mark.slow
def test_sigterm_saves_the_step_reached_and_exits_75(env, reference):
  del reference  # only for the compilation cache
  workdir = env["root"] / "terminated"
  process = ts.start(env, workdir)
  _wait_for_checkpoint(process, workdir)
  process.send_signal(signal.SIGTERM)
  assert process.wait(120) == preemption.EXIT_PREEMPTED == 75, ts.output(workdir)
  log = (workdir / "log.txt").read_text()
  stopped = [line for line in log.splitlines() if "SIGTERM: saved a checkpoint at step" in line]
  assert stopped, log
  step = int(stopped[0].split("at step ")[1].split()[0])
  assert step < STEPS
  assert max(_losses(workdir)) == step  # the last step trained is the one saved
  step_dir = workdir / "checkpoints" / str(step)
  assert not checkpoint._missing_files(step_dir)  # pylint: disable=protected-access
  assert not (workdir / "results.json").exists()


def test_exit_status_tells_preempted_from_finished():
  assert preemption.exit_status({"preempted": True, "step": 3, "signal": "SIGTERM"}) == 75
  assert preemption.exit_status({"metrics": {"R@1": 1.0}, "step": 9}) is None  # exit 0


def _state(width=3):
  """A small state pytree standing in for the TrainState."""
  dense = {"kernel": jnp.ones((2, width)), "bias": jnp.arange(width, dtype=jnp.float32)}
  return {"step": jnp.int32(2), "params": {"dense": dense}}


def _save(workdir, state, step):
  manager = checkpoint.make_manager(workdir, 3)
  checkpoint.save(manager, step, state)
  manager.wait_until_finished()
  manager.close()


def test_incomplete_newest_checkpoint_is_ignored(tmp_path):
  _save(tmp_path, _state(), 2)
  directory = tmp_path / "checkpoints"
  # A newer step dir cut short (no metadata), and a leftover Orbax tmp dir.
  broken = directory / "7"
  (broken / "default").mkdir(parents=True)
  (broken / "default" / "junk").write_bytes(b"\0" * 10)
  (directory / "9.orbax-checkpoint-tmp-123").mkdir()
  messages = []
  manager = checkpoint.make_manager(tmp_path, 3, log=messages.append)
  text = "\n".join(messages)
  assert "incomplete checkpoint" in text and str(broken) in text, text
  assert "9.orbax-checkpoint-tmp-123" in text, text
  assert not broken.exists() and list(directory.glob("7.incomplete-*"))
  zeros = jax.tree.map(jnp.zeros_like, _state())
  restored, step = checkpoint.restore_latest(manager, zeros, log=messages.append)
  assert step == 2
  np.testing.assert_array_equal(restored["params"]["dense"]["bias"], [0, 1, 2])


def test_restore_skips_a_step_without_metadata(tmp_path):
  _save(tmp_path, _state(), 1)
  _save(tmp_path, jax.tree.map(lambda x: x + 1, _state()), 2)
  (tmp_path / "checkpoints" / "2" / "_CHECKPOINT_METADATA").unlink()
  messages = []
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    restored, step = checkpoint.restore_latest(manager, _state(), log=messages.append)
  assert step == 1 and int(restored["step"]) == 2
  assert "skipping incomplete checkpoint" in messages[0] and "/2" in messages[0], messages


def _tiny_random_config(**overrides):
  """An in-process config over a random split registered as dataset 'random'."""
  return fakes.tiny_config("concat", **{"data.name": "random", "data.max_text_len": 8,
                                        "eval.batch_size": 8, **overrides})


@pytest.fixture
def random_dataset(monkeypatch):
  monkeypatch.setitem(registry.LOADERS, "random",
                      lambda data_config, split, log: fakes.random_split(
                          num_images=16, num_queries=16, name=f"random/{split}"))


@pytest.mark.slow
def test_nan_loss_raises_before_any_checkpoint_is_written(tmp_path, random_dataset):
  del random_dataset
  # Warm-up makes step 1's rate 0 (a finite, logged step); step 2's rate of 1e36
  # overflows the weights, which only the pre-save check sees (step 2 is not logged).
  config = _tiny_random_config(num_train_steps=4, checkpoint_every_steps=2,
                               log_every_steps=100, eval_every_steps=100,
                               **{"optimizer.learning_rate": 1e36, "optimizer.warmup_steps": 1})
  with pytest.raises(FloatingPointError, match=r"at step 2 \(before saving a checkpoint\)"):
    train.train_and_evaluate(config, tmp_path)
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name[0].isdigit()]
  assert np.isfinite(_losses(tmp_path)[1][0])  # step 1 was logged, and was fine


@pytest.mark.slow
def test_tensorboard_has_the_training_scalars(reference):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in (reference / "tensorboard").iterdir():
    for record in tf.data.TFRecordDataset(str(path)):
      event = event_pb2.Event.FromString(record.numpy())
      for value in event.summary.value:
        assert value.metadata.plugin_data.plugin_name == "scalars"  # what TensorBoard plots
        tags.add(value.tag)
  expected = {"loss", "learning_rate", "grad_norm", "param_norm", "batch_R@1", "batch_R@10",
              "perf/steps_per_sec", "perf/examples_per_sec", "perf/first_steps_sec",
              "eval/R@1", "eval/R@10", "perf/eval_sec"}
  assert expected <= tags, expected - tags


def _truncate(path, size):
  path.write_bytes(path.read_bytes()[:size])


# The three corruptions of issue 15, each naming the file the message must name.
CORRUPTIONS = {
    "array data": lambda d: _truncate(sorted((d / "default" / "d").iterdir())[0], 10),
    "tree metadata": lambda d: _truncate(d / "default" / "_METADATA", 20),
    "ocdbt manifest": lambda d: _truncate(d / "default" / "manifest.ocdbt", 0),
}


def _three_steps(workdir):
  for step in (1, 2, 3):
    _save(workdir, jax.tree.map(lambda x, s=step: x + s, _state()), step)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_is_moved_aside_and_the_next_restores(tmp_path, kind):
  _three_steps(tmp_path)
  directory = tmp_path / "checkpoints"
  CORRUPTIONS[kind](directory / "3")
  bad = {"array data": str(directory / "3" / "default" / "d"),
         "tree metadata": str(directory / "3" / "default" / "_METADATA"),
         "ocdbt manifest": str(directory / "3" / "default" / "manifest.ocdbt")}[kind]
  messages = []
  manager = checkpoint.make_manager(tmp_path, 3, log=messages.append)
  restored, step = checkpoint.restore_latest(manager, _state(), log=messages.append)
  assert step == 2
  np.testing.assert_array_equal(restored["params"]["dense"]["bias"], [2, 3, 4])
  warning = [m for m in messages if "does not restore" in m]
  assert len(warning) == 1 and "\n" not in warning[0], messages
  assert f"checkpoint {directory / '3'} does not restore (bad file {bad}" in warning[0]
  assert not (directory / "3").exists() and len(list(directory.glob("3.corrupt-*"))) == 1
  # Step 3 can be saved again by the resumed run.
  checkpoint.save(manager, 3, _state())
  manager.wait_until_finished()
  assert manager.all_steps() == [1, 2, 3]
  manager.close()


def test_no_checkpoint_restores_lists_them_and_moves_nothing(tmp_path):
  _three_steps(tmp_path)
  directory = tmp_path / "checkpoints"
  for step in (1, 2, 3):
    CORRUPTIONS["tree metadata"](directory / str(step))
  manager = checkpoint.make_manager(tmp_path, 3, log=lambda _: None)
  with pytest.raises(RuntimeError, match=r"no checkpoint in .* restores") as error:
    checkpoint.restore_latest(manager, _state(), log=lambda _: None)
  for step in (1, 2, 3):
    assert f"{directory / str(step) / 'default' / '_METADATA'}: not valid JSON" in str(error.value)
  assert sorted(p.name for p in directory.iterdir()) == ["1", "2", "3"]


def test_resume_from_another_run_skips_its_corrupt_step_without_moving_it(tmp_path):
  _three_steps(tmp_path / "other")
  CORRUPTIONS["ocdbt manifest"](tmp_path / "other" / "checkpoints" / "3")
  restored, step = checkpoint.restore_from_directory(tmp_path / "other", _state(),
                                                     log=lambda _: None)
  assert step == 2 and (tmp_path / "other" / "checkpoints" / "3").exists()
