"""TIRG (fc-level) on CIRR: Recall@{1,5,10,50}, Recall_subset@{1,2,3}, (R@5 + R_subset@1)/2.

manual_dir must hold captions/cap.rc2.*.json, image_splits/split.rc2.*.json (or cirr/...)
and the NLVR2 images under the relative paths of the split files (see cir_jax/data/cirr.py).
Train and evaluate on val:
  python -m cir_jax.train --config configs/tirg_cirr.py --config.init_from=/ckpt/resnet-18 \
      --config.data.manual_dir=/path/to/cirr --workdir runs/tirg_cirr
Test server files (test1):
  python tools/cirr_submission.py --config configs/tirg_cirr.py \
      --config.data.manual_dir=/path/to/cirr --workdir runs/tirg_cirr

Image encoder, as the paper (section 4, "ResNet-17 ... pretrained on ImageNet") and google/tirg
(torchvision `resnet18(pretrained=True)`): ResNet-18 from ImageNet weights, given with
--config.init_from=DIR: a local microsoft/resnet-18 directory, or torchvision's
resnet18-f37072fd.pth converted once with `python tools/convert_torchvision_resnet.py FILE DIR`.
Without init_from the ResNet-18 trains from scratch (its trunk still at 0.1x the rate): not the
paper's run, expect far lower recall. The trunk (`image_encoder/`) learns at 0.1x the rate and its
fc (our `target_proj`) and the rest at 1x, as google/tirg main.py does on every real-image dataset.
(TIRG's paper has no CIRR/FashionIQ runs; this applies google/tirg's real-image recipe.)
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, steps=0)
  c = common.base_config()
  c.data.name = "cirr"
  c.data.image_size = 224
  c.data.train_split = "train"
  c.data.eval_split = "val"
  c.data.max_text_len = 40
  c.model.composer = "tirg"
  common.tirg_resnet18(c, real_images=True)
  c.loss.name = "batch_classification"
  c.batch_size = 32
  c.num_train_steps = 100_000
  c.eval_every_steps = 5_000
  c.checkpoint_every_steps = 5_000
  c.log_every_steps = 100
  c.eval.ks = (1, 5, 10, 50)
  if arg.steps:
    c.num_train_steps = arg.steps
  return c
