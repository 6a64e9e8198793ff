"""TIRG (fc-level) on Fashion200k with the TIRG paper's settings (section 4.1, Table 1).

manual_dir must hold labels/{dress,jacket,pants,skirt,top}_{train,test}_detect_all.txt,
test_queries.txt and the image tree the label files name (see cir_jax/data/fashion200k.py).
Paper run (ResNet-18, LSTM 512, K = B batch classification loss, 160k steps, batch 32):
  python -m cir_jax.train --config configs/tirg_fashion200k.py --config.init_from=/ckpt/resnet-18 \
      --config.data.manual_dir=/path/to/fashion200k --workdir runs/tirg_fashion200k
Evaluate a workdir (R@1, R@10, R@50 on test_queries.txt):
  python -m cir_jax.evaluate --config configs/tirg_fashion200k.py \
      --config.data.manual_dir=/path/to/fashion200k --workdir runs/tirg_fashion200k

Image encoder, as the paper (section 4, "ResNet-17 ... pretrained on ImageNet") and google/tirg
(torchvision `resnet18(pretrained=True)`): ResNet-18 from ImageNet weights, given with
--config.init_from=DIR: a local microsoft/resnet-18 directory, or torchvision's
resnet18-f37072fd.pth converted once with `python tools/convert_torchvision_resnet.py FILE DIR`.
Without init_from the ResNet-18 trains from scratch (its trunk still at 0.1x the rate): not the
paper's run, expect far lower recall. The trunk (`image_encoder/`) learns at 0.1x the rate and its
fc (our `target_proj`) and the rest at 1x, as google/tirg main.py does on every real-image dataset.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=0)
  c = common.base_config()
  c.data.name = "fashion200k"
  c.data.image_size = 224
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.pairs_per_image = 4      # ~690k fixed pairs; the reference redraws per access
  c.model.composer = "tirg"       # fc-level TIRG on pooled ResNet features
  common.tirg_resnet18(c, real_images=True)
  c.loss.name = "batch_classification"   # K = B (Eq. 6): "more difficult to converge"
  c.batch_size = 32
  c.num_train_steps = 160_000
  c.optimizer.decay_steps = (50_000,)
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 5_000
  c.log_every_steps = 100
  c.eval.ks = (1, 10, 50)
  if arg.steps:
    c.num_train_steps = arg.steps
  return c
