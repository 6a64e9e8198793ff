"""Small generated data for tests: random RetrievalSplits (re-exported), tiny configs, and
`run_steps`, the trainer's experiment and step run for a few steps."""
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from cir_jax import evaluate as evaluate_lib
from cir_jax import experiment
from cir_jax import train
from cir_jax.data import pipeline
from cir_jax.data.random_data import random_split  # noqa: F401 (re-exported)
from cir_jax.data.tokenizer_vocab import TokenizerVocabulary
from cir_jax.data.vocab import Vocabulary
from configs import common


def tiny_config(composer="tirg", **overrides):
  """A base config with the tiny ResNet and small widths (fast on CPU)."""
  c = common.base_config()
  c.model.image_encoder = "resnet_tiny"
  c.model.composer = composer
  c.model.embed_dim = 16
  c.model.word_dim = 8
  c.model.text_hidden_dim = 16
  c.data.image_size = 32
  # XLA's native convs compile in about half the time of the CPU matmul lowering
  # ('auto'), and compiling dominates this suite; tests/test_conv.py checks the two
  # lowerings agree and tests/test_train.py runs the sharded step with 'auto'.
  c.model.conv_impl = "xla"
  c.batch_size = 8
  c.eval.batch_size = 16
  c.eval.block_size = 8
  c.eval.ks = (1, 5, 10)
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = value
  return c


class Run(NamedTuple):
  """What `run_steps` returns: the step losses, the final state (on the host), the
  model, and with `evaluate` the gallery metrics before and after training."""
  losses: np.ndarray
  state: Any
  model: Any
  before: Optional[dict] = None
  after: Optional[dict] = None


def make_vocab(config, split):
  """The word vocabulary of `split`, or the tokenizer of config.data.tokenizer."""
  if config.data.get("tokenizer", "vocab") == "vocab":
    return Vocabulary.build(split.texts)
  return TokenizerVocabulary(config.data.tokenizer)


def run_steps(config, split, devices: int, steps: int = 2, evaluate: bool = False) -> Run:
  """Trains `steps` steps of `config` on `split` on a mesh of the first `devices` devices.

  The experiment (model, optimiser, state) comes from `cir_jax.experiment.build`,
  the step from `cir_jax.train.make_train_step`: the trainer's own code. With
  `evaluate`, `split` is also the evaluation split (via the registry, see
  pretrained_fakes.use_split) and is scored before and after training.
  """
  mesh = experiment.make_mesh(config, jax.devices()[:devices])
  vocab = make_vocab(config, split)
  data = pipeline.TrainPipeline(split, vocab, config.data.max_text_len, config.batch_size, mesh,
                                config.seed, config.data.image_size,
                                set_negatives=config.loss.get("set_negatives", 0))
  exp = experiment.build(config, mesh, vocab)
  state, evaluator, before = exp.state, None, None
  if evaluate:
    evaluator = evaluate_lib.make_evaluator(config, exp.model, vocab, mesh, log=lambda *_: None)
    before = evaluator.evaluate(exp.variables)["metrics"]
  step_fn = train.make_train_step(exp.model, exp.tx, config.loss, mesh)
  batches, losses = data.batches(0), []
  for _ in range(steps):
    state, metrics = step_fn(state, next(batches))
    losses.append(float(metrics["loss"]))
  after = None
  if evaluate:
    after = evaluator.evaluate({"params": state.params,
                                "batch_stats": state.batch_stats})["metrics"]
  return Run(np.array(losses), jax.device_get(state), exp.model, before, after)
