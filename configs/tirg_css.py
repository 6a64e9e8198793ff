"""TIRG (last-conv) on CSS, 3D->3D, with the TIRG paper's settings (Table 4).

Paper run (150k steps, lr 0.01, SGD momentum, batch 32, ResNet-18, soft triplet K=2):
  python -m cir_jax.train --config configs/tirg_css.py --workdir runs/tirg_css
CPU demo (narrow ResNet, ~2.4k steps; what `make demo` runs):
  python -m cir_jax.train --config configs/tirg_css.py:cpu --workdir runs/demo
2D->3D setting (separate encoders for the 2D queries and 3D targets):
  python -m cir_jax.train --config configs/tirg_css.py:cpu,query_2d --workdir runs/demo_2d
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, cpu=False, query_2d=False, res=64, steps=0)
  c = common.base_config()
  c.data.name = "css"
  c.data.image_size = arg.res
  c.data.placement = "auto"            # the uint8 renders (~0.3 GB at 64 px) live on device
  c.model.composer = "tirg_lastconv"   # CSS edits are spatial: modify the last conv map
  c.model.image_encoder = "resnet18"
  c.loss.name = "soft_triplet"
  c.batch_size = 32
  c.num_train_steps = 150_000
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 5_000
  c.log_every_steps = 100
  if arg.query_2d:
    c.data.query_render = "2d"
    c.model.separate_query_encoder = True
  if arg.cpu:
    c.model.image_encoder = "resnet_small"
    c.model.embed_dim = 256
    c.model.word_dim = 256
    c.model.text_hidden_dim = 256
    c.num_train_steps = 2400
    c.eval_every_steps = 2400
    c.checkpoint_every_steps = 600
    c.log_every_steps = 100
  if arg.steps:
    c.num_train_steps = arg.steps
  return c
