"""An experiment built from its config: mesh, vocabulary, model, optimiser and train state.

Imports flow one way: data, models, losses, retrieval -> experiment -> evaluate
-> train. Training (`setup_training`) loads the training split and builds its
input pipeline; evaluation (`restore_for_evaluation`) needs neither: the word
vocabulary comes from the workdir (`vocab.json`, written when training started)
and the state's shapes from the config alone (`example_batch`).

Resume order (DESIGN.md): the workdir's newest checkpoint, then `config.resume`
(another workdir), then `config.init_from` (pretrained weights), then scratch.
"""
import dataclasses
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from cir_jax import checkpoint
from cir_jax import feature_cache
from cir_jax import init_from as init_from_lib
from cir_jax import losses
from cir_jax import multihost
from cir_jax import optim
from cir_jax import param_groups
from cir_jax import seeds as seeds_lib
from cir_jax import sharding
from cir_jax import train_state as train_state_lib
from cir_jax.data import device_data
from cir_jax.data import registry
from cir_jax.data.tokenizer_vocab import TokenizerVocabulary
from cir_jax.data.vocab import Vocabulary
from cir_jax.models import build as build_lib

VOCAB_FILE = "vocab.json"


@dataclasses.dataclass
class Experiment:
  """Everything a train or evaluation loop needs besides the data."""
  config: Any
  mesh: jax.sharding.Mesh
  vocab: Any                 # Vocabulary or TokenizerVocabulary
  model: Any                 # RetrievalModel
  tx: optax.GradientTransformation
  state: train_state_lib.TrainState

  @property
  def variables(self) -> dict:
    """{'params', 'batch_stats'} of the current state (what `model.apply` takes)."""
    return {"params": self.state.params, "batch_stats": self.state.batch_stats}


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  """Joins the cluster (if configured), builds the 'data' mesh, checks both batch sizes.

  Raises ValueError before anything compiles if a batch size does not divide
  over the devices.
  """
  multihost.initialize(config)  # first: JAX cannot join a cluster once a backend exists
  mesh = sharding.make_mesh(devices)
  sharding.local_batch_size(config.batch_size, mesh)
  sharding.local_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  return mesh


def tokenizer_name(config) -> str:
  return config.data.get("tokenizer", "vocab")


def load_vocabulary(config, workdir, train_split=None):
  """The tokenizer of `config.data.tokenizer`, or the word vocabulary of the workdir.

  The word vocabulary (tokenizer 'vocab', for the LSTM) is built from the
  training captions when training starts and saved as `<workdir>/vocab.json`,
  so evaluation and tools reuse it without the training split.

  Args:
    config: the experiment config.
    workdir: the run's directory.
    train_split: the training RetrievalSplit; needed only the first time (no
      vocab.json yet). Without it a missing vocab.json is an error.
  """
  name = tokenizer_name(config)
  if name != "vocab":
    return TokenizerVocabulary(name)
  path = pathlib.Path(workdir) / VOCAB_FILE
  if path.exists():
    return Vocabulary.load(path)
  if train_split is None:
    raise FileNotFoundError(
        f"{path} does not exist: the word vocabulary is written when training starts; "
        f"is --workdir={str(workdir)!r} a training run of this config?")
  # Every process builds the same vocabulary from the same captions; process 0
  # also saves it, via a rename so that no process can read a half-written file.
  vocab = Vocabulary.build(train_split.texts)
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    vocab.save(partial)
    partial.replace(path)
  return vocab


def example_batch(config, batch_size: Optional[int] = None) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a training batch of `config` (what TrainPipeline yields).

  'ref_image', 'target_image' uint8 [B, S, S, 3]; 'text_ids' int32 [B, L];
  'text_mask' bool [B, L]; with loss.set_negatives = N also
  'set_negative_images' uint8 [B, N, S, S, 3] and 'set_negative_mask' bool [B, N].
  """
  b = batch_size or config.batch_size
  s, length = config.data.image_size, config.data.max_text_len
  image = jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8)
  batch = {"ref_image": image, "target_image": image,
           "text_ids": jax.ShapeDtypeStruct((b, length), jnp.int32),
           "text_mask": jax.ShapeDtypeStruct((b, length), jnp.bool_)}
  negatives = config.loss.get("set_negatives", 0)
  if negatives:
    batch["set_negative_images"] = jax.ShapeDtypeStruct((b, negatives, s, s, 3), jnp.uint8)
    batch["set_negative_mask"] = jax.ShapeDtypeStruct((b, negatives), jnp.bool_)
  return batch


def params_shapes(model, example: dict) -> Any:
  """The params tree of `model` as ShapeDtypeStructs (no FLOPs, no memory)."""
  return jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)},
                         {k: jnp.zeros(v.shape, v.dtype) for k, v in example.items()},
                         train=False))["params"]


def check_config(config):
  """Config errors that need no data: the loss name and options the loss reads,
  steps_per_call."""
  losses.get_loss_fn(config.loss)
  steps_per_call = config.get("steps_per_call", 1)
  if not isinstance(steps_per_call, int) or steps_per_call < 1:
    raise ValueError(f"steps_per_call={steps_per_call!r} must be an integer >= 1")
  if config.loss.get("set_negatives", 0) and config.loss.name != "soft_triplet":
    raise ValueError(f"loss.set_negatives={config.loss.set_negatives} is read only by the "
                     f"soft_triplet loss, not by loss.name={config.loss.name!r}")
  build_lib.check_tokenizer(config.model, tokenizer_name(config))


def build(config, mesh, vocab, log=None) -> Experiment:
  """Model, optimiser and a freshly initialised train state (replicated over `mesh`)."""
  check_config(config)
  model = build_lib.build_model(config.model, len(vocab), config.data.image_size)
  example = example_batch(config)
  # The optimizer's parameter groups (freezing, lr multipliers) need the params' paths.
  shapes = params_shapes(model, example)
  tx = optim.make_optimizer(config.optimizer, shapes)
  if log is not None:
    freeze = tuple(config.optimizer.get("freeze", ()))
    rules = tuple(tuple(r) for r in config.optimizer.get("lr_multipliers", ()))
    log("parameters: " + param_groups.summary(shapes, freeze, rules, per_param=False)
        .replace("\n", "; "))
  state = train_state_lib.create_train_state(model, tx, example, config.seed, mesh,
                                             num_seeds=seeds_lib.num_seeds(config))
  return Experiment(config, mesh, vocab, model, tx, state)


def restore_or_init(experiment: Experiment, manager, log) -> Experiment:
  """Resume order: workdir checkpoint, then config.resume, then config.init_from, then scratch."""
  config, state = experiment.config, experiment.state
  state, step = checkpoint.restore_latest(manager, state, log)
  if step is not None:
    log(f"resumed from {manager.directory} at step {step}")
  elif config.resume:
    state, step = checkpoint.restore_from_directory(config.resume, state, log)
    log(f"resumed from {config.resume} at step {step}")
  elif config.init_from or config.get("init_from_image") or config.get("init_from_text"):
    if seeds_lib.num_seeds(config) > 1:
      raise ValueError(f"num_seeds={config.num_seeds} with init_from is not supported yet: "
                       f"pretrained weights load into one replica's state; use num_seeds=1")
    state = init_from_lib.load_into_state(config, experiment.model, state, log)
  else:
    log("training from scratch")
  return dataclasses.replace(experiment, state=state)


def setup_training(config, workdir, log) -> tuple[Experiment, Any]:
  """Mesh, training split and its input (a tf.data TrainPipeline, or DeviceTrainData under
  data.placement 'device'/'auto', see cir_jax/data/device_data.py, or, when frozen towers'
  features are cached, a feature_cache.Pending to `build` once the state is restored),
  vocabulary, model, optimiser, fresh state."""
  check_config(config)  # a bad name fails before loading data or compiling
  mesh = make_mesh(config)
  train_split = registry.load_split(config.data, config.data.train_split, log=log)
  vocab = load_vocabulary(config, workdir, train_split)
  experiment = build(config, mesh, vocab, log)
  set_negatives = config.loss.get("set_negatives", 0)
  plan = feature_cache.resolve(config, experiment.model, experiment.variables, log)
  if plan is not None:  # frozen towers: features computed after restore (train.py)
    return experiment, feature_cache.Pending(plan, train_split, vocab)
  if device_data.resolve_placement(config.data, train_split, log) == "device":
    train_data = device_data.DeviceTrainData(train_split, vocab, config.data.max_text_len,
                                             config.batch_size, mesh, config.seed, log=log,
                                             set_negatives=set_negatives)
  else:
    from cir_jax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
    pipes = [pipeline.TrainPipeline(train_split, vocab, config.data.max_text_len,
                                    config.batch_size, mesh, seed, config.data.image_size,
                                    log=log, set_negatives=set_negatives,
                                    **pipeline.preprocess_kwargs(config.data))
             for seed in seeds_lib.seed_list(config)]
    train_data = pipes[0] if len(pipes) == 1 else seeds_lib.StackedPipelines(pipes, mesh)
  return experiment, train_data


def restore_for_evaluation(config, workdir, log) -> tuple[Experiment, int]:
  """The newest checkpoint of `workdir`, without touching the training split.

  Returns:
    (experiment with the restored state, its step).

  Raises:
    FileNotFoundError: `workdir` does not exist, has no vocabulary (word
      vocabulary configs) or no checkpoint.
  """
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise FileNotFoundError(f"workdir {str(workdir)!r} does not exist; train first "
                            f"(python -m cir_jax.train --config ... --workdir {workdir})")
  check_config(config)
  mesh = make_mesh(config)
  experiment = build(config, mesh, load_vocabulary(config, workdir))
  manager = checkpoint.make_manager(workdir, config.keep_checkpoints, log)
  state, step = checkpoint.restore_latest(manager, experiment.state, log)
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {manager.directory}; train first")
  return dataclasses.replace(experiment, state=state), step
