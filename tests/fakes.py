"""Small generated data for tests: random RetrievalSplits (re-exported), tiny configs."""
from cir_jax.data.random_data import random_split  # pylint: disable=unused-import
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
