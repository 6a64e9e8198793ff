"""CLIP4Cir stage 1 on FashionIQ (all three categories, one random caption form per triplet
and epoch); settings as configs/combiner_stage1_cirr.py. Stage 2: configs/combiner_fashioniq.py
with `init_from=<this workdir>`.

  python -m cir_jax.train --config configs/combiner_stage1_fashioniq.py:init_from=/ckpt/clip-vit-base-patch32 \
      --config.data.manual_dir=/path/to/fashion-iq --workdir runs/clip4cir_stage1_fashioniq
"""
from configs import combiner_stage1_cirr
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, init_from="", tiny=False, steps=0)
  c = combiner_stage1_cirr.get_config(f"init_from={arg.init_from}" if arg.init_from else None)
  c.data.name = "fashioniq"
  c.data.category = "dress"
  c.data.train_categories = ("dress", "shirt", "toptee")
  c.data.caption_join = "random_forms"
  epoch = common.steps_per_epoch(common.FASHIONIQ_TRAIN_TRIPLETS, c.batch_size)
  c.num_train_steps = 100 * epoch
  c.eval_every_steps = epoch
  c.checkpoint_every_steps = epoch
  c.eval.ks = (10, 50)
  c.eval.gallery_variants = ("exclude_ref", "include_ref")
  if arg.tiny:
    common.use_tiny_encoders(c, "clip_vision_tiny", "clip_text_tiny")
  if arg.steps:
    c.num_train_steps = arg.steps
  return c
