"""TIRG (last-conv) on CSS, 3D->3D, with the TIRG paper's settings (Table 4).

Paper run (150k steps, lr 0.01, SGD momentum, batch 32, ResNet-18, soft triplet K=2):
  python -m cir_jax.train --config configs/tirg_css.py --config.init_from=/ckpt/resnet-18 \
      --workdir runs/tirg_css
CPU demo (narrow ResNet from scratch, ~2.4k steps; what `make demo` runs):
  python -m cir_jax.train --config configs/tirg_css.py:cpu --workdir runs/demo
2D->3D setting (separate encoders for the 2D queries and 3D targets):
  python -m cir_jax.train --config configs/tirg_css.py:cpu,query_2d --workdir runs/demo_2d

Image encoder: google/tirg starts from ImageNet weights on CSS too (torchvision
`resnet18(pretrained=True)`; the paper, section 4: "ResNet-17 ... pretrained on ImageNet"), and
keeps one learning rate for all parameters on CSS (its 0.1x trunk group is for real images
only). Give the weights with --config.init_from=DIR (a microsoft/resnet-18 directory, or
torchvision's resnet18-f37072fd.pth converted with tools/convert_torchvision_resnet.py; with
query_2d both encoders start from them). Without init_from the ResNet-18 trains from scratch:
a deviation from the paper. The CPU demo is such a deviation on purpose: a narrow ResNet-10
(`resnet_small`, no ImageNet weights exist for it) from scratch, 64 px, 2.4k steps, widths 256.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, cpu=False, query_2d=False, res=64, steps=0)
  c = common.base_config()
  c.data.name = "css"
  c.data.image_size = arg.res
  c.data.placement = "auto"            # the uint8 renders (~0.3 GB at 64 px) live on device
  c.model.composer = "tirg_lastconv"   # CSS edits are spatial: modify the last conv map
  common.tirg_resnet18(c, real_images=False)
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
    # 4 steps per compiled call: the same steps, +25-35% examples/s on CPU (XLA:CPU maps
    # its temporary buffer once per call; docs/benchmarks.md).
    c.steps_per_call = 4
  if arg.steps:
    c.num_train_steps = arg.steps
  return c
