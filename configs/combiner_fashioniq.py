"""CLIP4Cir's Combiner on FashionIQ: stage 2 (CLIP fixed, from the stage-1 workdir of
configs/combiner_stage1_fashioniq.py); settings as configs/combiner_cirr.py.

  python -m cir_jax.train --config configs/combiner_fashioniq.py:init_from=runs/clip4cir_stage1_fashioniq,tokenizer=/ckpt/clip-vit-base-patch32 \
      --config.data.manual_dir=/path/to/fashion-iq --workdir runs/clip4cir_stage2_fashioniq
"""
from configs import combiner_cirr
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, init_from="", tokenizer="", tiny=False, steps=0)
  c = combiner_cirr.get_config(",".join(f"{k}={v}" for k, v in (
      ("init_from", arg.init_from), ("tokenizer", arg.tokenizer)) if v) or None)
  c.data.name = "fashioniq"
  c.data.category = "dress"
  c.data.train_categories = ("dress", "shirt", "toptee")
  c.data.caption_join = "random_forms"
  epoch = common.steps_per_epoch(common.FASHIONIQ_TRAIN_TRIPLETS, c.batch_size)
  c.num_train_steps = 300 * epoch
  c.eval_every_steps = 5 * epoch
  c.checkpoint_every_steps = 5 * epoch
  c.log_every_steps = epoch
  c.eval.ks = (10, 50)
  c.eval.gallery_variants = ("exclude_ref", "include_ref")
  if arg.tiny:
    common.use_tiny_encoders(c, "clip_vision_tiny", "clip_text_tiny")
  if arg.steps:
    c.num_train_steps = arg.steps
  return c
