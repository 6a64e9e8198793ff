"""Bad input -> a clear error naming the offending name/field/file, before compiling.

Each test feeds one kind of bad input through the public entry point a user
would hit (mostly `train.train_and_evaluate`, with a random split registered as
dataset 'random' so nothing is generated) and asserts the message names it.
"""
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cir_jax import checkpoint
from cir_jax import experiment
from cir_jax import losses
from cir_jax import sharding
from cir_jax import train
from cir_jax.data import pipeline
from cir_jax.data import registry
from cir_jax.data.tables import RetrievalSplit
from cir_jax.data.vocab import Vocabulary
from cir_jax.models import composers
from configs import tirg_cirr
from configs import tirg_fashion200k
from configs import tirg_fashioniq
from configs import tirg_mit_states
from tests import fakes

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def random_dataset(monkeypatch):
  monkeypatch.setitem(registry.LOADERS, "random",
                      lambda data_config, split, log: fakes.random_split(
                          num_images=16, num_queries=16, name=f"random/{split}"))


def _config(**overrides):
  return fakes.tiny_config("concat", **{"data.name": "random", "data.max_text_len": 8,
                                        "eval.batch_size": 8, **overrides})


@pytest.mark.parametrize("field,value,valid", [
    ("model.composer", "tirgg", f"valid composers: {sorted(composers.COMPOSERS)}"),
    ("data.name", "cssx", "valid datasets: "),  # the list is checked below
    ("loss.name", "hinge", f"valid losses: {sorted(losses.LOSSES)}"),
])
def test_unknown_names_list_the_valid_ones(tmp_path, random_dataset, field, value, valid):
  del random_dataset
  with pytest.raises(ValueError, match=re.escape(f"{value!r}; {valid}")):
    train.train_and_evaluate(_config(**{field: value}), tmp_path)
  with pytest.raises(ValueError, match=re.escape(f"valid datasets: {sorted(registry.LOADERS)}")):
    train.train_and_evaluate(_config(**{"data.name": "cssx"}), tmp_path)


def test_batch_not_divisible_by_devices(tmp_path, random_dataset):
  del random_dataset
  with pytest.raises(ValueError, match=re.escape(
      "batch_size=12 must be a positive multiple of the number of devices "
      "(8 devices over 1 process(es))")):
    train.train_and_evaluate(_config(batch_size=12), tmp_path)


def _save(workdir, state, step=1):
  manager = checkpoint.make_manager(workdir, 3)
  checkpoint.save(manager, step, state)
  manager.wait_until_finished()
  manager.close()


def test_checkpoint_of_another_model_names_keys_and_shapes(tmp_path):
  saved = {"step": jnp.int32(1), "params": {"fc": {"kernel": jnp.ones((4, 16))},
                                            "old": {"bias": jnp.zeros(3)}}}
  _save(tmp_path, saved)
  expected = {"step": jnp.int32(0), "params": {"fc": {"kernel": jnp.ones((4, 32))},
                                               "new": {"bias": jnp.zeros(5)}}}
  manager = checkpoint.make_manager(tmp_path, 3)
  with pytest.raises(ValueError) as error:
    checkpoint.restore_latest(manager, expected)
  message = str(error.value)
  assert f"checkpoint {tmp_path / 'checkpoints' / '1'} does not match" in message
  assert "missing from the checkpoint: params/new/bias [5]" in message
  assert "in the checkpoint but not in this model: params/old/bias [3]" in message
  assert "shapes differ: params/fc/kernel checkpoint [4, 16] vs model [4, 32]" in message


def test_checkpoint_of_another_model_vs_a_real_train_state(tmp_path):
  # The real TrainState's key names (attributes, optax tuples) against Orbax's
  # saved tree; eval_shape traces the init without compiling it.
  config = _config()
  state = jax.eval_shape(lambda: experiment.build(config, _mesh(), range(20)).state)
  _save(tmp_path, {"step": jnp.int32(1), "params": {"composer": {"fc": {"kernel": jnp.ones(3)}}}})
  with pytest.raises(ValueError) as error:
    checkpoint.check_matches(tmp_path / "checkpoints" / "1", state)
  message = str(error.value)
  assert "in the checkpoint but not in this model: params/composer/fc/kernel [3]" in message
  assert re.search(r"missing from the checkpoint: batch_stats/\S+ \[\d+\], ", message), message
  assert "(+" in message  # the rest is counted, not listed


def test_workdir_empty_a_file_or_missing_is_named(tmp_path, monkeypatch, random_dataset):
  del random_dataset
  monkeypatch.chdir(tmp_path)  # were "" accepted, it would write here, not into the repo
  with pytest.raises(ValueError, match=r"--workdir='' is empty"):
    train.train_and_evaluate(_config(), "")
  assert not list(tmp_path.iterdir())
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(NotADirectoryError, match=r"--workdir='a_file' is a file"):
    train.train_and_evaluate(_config(), "a_file")
  from cir_jax import evaluate  # pylint: disable=g-import-not-at-top
  with pytest.raises(FileNotFoundError, match=r"--workdir='nowhere': no such workdir"):
    evaluate.evaluate_workdir(_config(), "nowhere")
  assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("config_module", [tirg_cirr, tirg_fashioniq, tirg_fashion200k,
                                           tirg_mit_states])
def test_manual_dir_unset_missing_or_a_file_is_named(tmp_path, config_module):
  # What a user of a real-dataset config hits first: train_and_evaluate loads the split.
  config = config_module.get_config()
  config.data.data_dir = str(tmp_path / "prepared")
  with pytest.raises(ValueError, match=r"data\.manual_dir is empty\.\n"):
    train.train_and_evaluate(config, tmp_path / "run")
  config.data.manual_dir = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match=re.escape(
      f"data.manual_dir='{tmp_path}/nope' does not exist.")):
    train.train_and_evaluate(config, tmp_path / "run")
  (tmp_path / "file").write_text("x")
  config.data.manual_dir = str(tmp_path / "file")
  with pytest.raises(FileNotFoundError, match="is a file, not a directory"):
    train.train_and_evaluate(config, tmp_path / "run")


def _mesh():
  return sharding.make_mesh(jax.devices()[:1])


def test_empty_caption_names_the_query():
  split = fakes.random_split(num_queries=8)
  split.texts[5] = "   "
  vocab = Vocabulary.build([t for t in split.texts if t.strip()])
  with pytest.raises(ValueError, match="random/train: empty modification text for query 5"):
    pipeline.TrainPipeline(split, vocab, 8, 4, _mesh(), 0, 32)
  with pytest.raises(ValueError, match="empty modification text for query 5"):
    pipeline.EvalPipeline(split, vocab, 8, 4, _mesh(), 32)


def test_caption_without_known_words_names_the_query():
  split = fakes.random_split(num_queries=8)
  split.texts[2] = "?!"
  vocab = Vocabulary.build(split.texts)
  with pytest.raises(ValueError, match=re.escape("query 2 text '?!' has no words")):
    pipeline.TrainPipeline(split, vocab, 8, 4, _mesh(), 0, 32)


def _file_split(tmp_path, num_images=4):
  paths = []
  tmp_path.mkdir(parents=True, exist_ok=True)
  for i in range(num_images):
    path = tmp_path / f"img{i}.png"
    Image.fromarray(np.full((20, 20, 3), 40 * i % 256, np.uint8)).save(path)
    paths.append(path)
  split = RetrievalSplit(
      name="files/train", images=None, image_paths=[str(p) for p in paths],
      image_labels=np.arange(num_images), image_ids=[p.name for p in paths],
      ref_index=np.arange(num_images), target_index=(np.arange(num_images) + 1) % num_images,
      target_label=(np.arange(num_images) + 1) % num_images,
      texts=["make it red"] * num_images)
  return split, paths


def test_corrupt_image_is_named_in_training_and_evaluation(tmp_path):
  split, paths = _file_split(tmp_path)
  paths[2].write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
  vocab = Vocabulary.build(split.texts)
  train_data = pipeline.TrainPipeline(split, vocab, 8, 4, _mesh(), 0, 16)
  with pytest.raises(ValueError, match=re.escape(f"cannot read or decode image {paths[2]} "
                                                 f"(gallery index 2")) as error:
    next(train_data.batches(0))
  assert "files/train, training step 0" in str(error.value)
  eval_data = pipeline.EvalPipeline(split, vocab, 8, 4, _mesh(), 16)
  with pytest.raises(ValueError, match=re.escape(f"cannot read or decode image {paths[2]}")):
    list(eval_data.gallery_batches())


def test_corrupt_image_is_named_by_the_trainer(tmp_path, monkeypatch):
  # A valid PNG header (passes the load-time check) over garbage: only decoding fails,
  # in the first batch the trainer reads (issue 15: TF's error named no file).
  split, paths = _file_split(tmp_path / "images", num_images=8)
  paths[0].write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
  monkeypatch.setitem(registry.LOADERS, "files", lambda data_config, name, log: split)
  with pytest.raises(ValueError, match=re.escape(f"cannot read or decode image {paths[0]} "
                                                 f"(gallery index 0")) as error:
    train.train_and_evaluate(_config(**{"data.name": "files"}), tmp_path / "run")
  assert "files/train, training step 0" in str(error.value)


def test_missing_image_file_is_named(tmp_path):
  split, paths = _file_split(tmp_path)
  paths[1].unlink()
  eval_data = pipeline.EvalPipeline(split, Vocabulary.build(split.texts), 8, 4, _mesh(), 16)
  with pytest.raises(ValueError, match=re.escape(f"cannot read or decode image {paths[1]}")):
    list(eval_data.query_batches())


def _unsafe_torch_loads(text):
  """torch.load uses that may unpickle arbitrary objects: any without weights_only=True in the
  call. weights_only=True is torch's restricted unpickler (tensors and plain containers only);
  the one use, tools/convert_torchvision_resnet.py, reads torchvision state dicts with it."""
  calls = re.finditer(r"torch\.load\b(\((?:[^()]|\([^()]*\))*\))?", text)
  return [m[0] for m in calls if not m[1] or not re.search(r"weights_only\s*=\s*True", m[1])]


def test_unsafe_torch_load_detector():
  assert _unsafe_torch_loads("x = torch.load(path)") == ["torch.load(path)"]
  assert _unsafe_torch_loads("f = torch.load") == ["torch.load"]
  assert _unsafe_torch_loads("torch.load(open(p), weights_only=False)")
  assert not _unsafe_torch_loads('torch.load(p, map_location="cpu", weights_only=True)')


def test_no_pickle_loading_in_the_code():
  # np.load(..., allow_pickle=True), pickle and torch.load can run code from a file.
  pattern = re.compile(r"allow_pickle\s*=\s*True|^\s*import pickle|pickle\.load|"
                       r"cloudpickle|dill\.load", re.M)
  offenders = [str(p.relative_to(REPO)) for folder in ("cir_jax", "tools", "configs")
               for p in (REPO / folder).rglob("*.py")
               if pattern.search(p.read_text()) or _unsafe_torch_loads(p.read_text())]
  assert not offenders, offenders
