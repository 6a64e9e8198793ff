"""TIRG (fc-level) on FashionIQ: R@10 / R@50 per category, averages, and their mean.

manual_dir must hold captions/cap.{dress,shirt,toptee}.*.json, image_splits/split.*.json and
images/<asin>.png or .jpg (see cir_jax/data/fashioniq.py). Trains on all three categories
(CLIP4Cir's randomised caption forms), evaluates dress val during training; `cir_jax.evaluate`
scores all three categories with both gallery variants (reference excluded / included):
  python -m cir_jax.train --config configs/tirg_fashioniq.py --config.init_from=/ckpt/resnet-18 \
      --config.data.manual_dir=/path/to/fashion-iq --workdir runs/tirg_fashioniq
  python -m cir_jax.evaluate --config configs/tirg_fashioniq.py \
      --config.data.manual_dir=/path/to/fashion-iq --workdir runs/tirg_fashioniq
About 4% of the image links are dead: add --config.data.skip_missing_images=True (counted).

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
  c.data.name = "fashioniq"
  c.data.image_size = 224
  c.data.train_split = "train"
  c.data.eval_split = "val"
  c.data.category = "dress"
  c.data.train_categories = ("dress", "shirt", "toptee")
  c.data.caption_join = "random_forms"   # train only; evaluation always "<C1> and <c2>"
  c.data.max_text_len = 40
  c.model.composer = "tirg"
  common.tirg_resnet18(c, real_images=True)
  c.loss.name = "batch_classification"
  c.batch_size = 32
  c.num_train_steps = 50_000
  c.eval_every_steps = 5_000
  c.checkpoint_every_steps = 5_000
  c.log_every_steps = 100
  c.eval.ks = (10, 50)
  c.eval.gallery_variants = ("exclude_ref", "include_ref")
  if arg.steps:
    c.num_train_steps = arg.steps
  return c
