"""SSN on FashionIQ with the paper's settings (section 4.2): as configs/ssn_cirr.py, and the
image encoder is fixed after one training epoch (only the text side keeps training).

  python -m cir_jax.train --config configs/ssn_fashioniq.py:init_from=/ckpt/clip-vit-base-patch32 \
      --config.data.manual_dir=/path/to/fashion-iq --workdir runs/ssn_fashioniq
  python -m cir_jax.evaluate --config configs/ssn_fashioniq.py:init_from=/ckpt/clip-vit-base-patch32 \
      --config.data.manual_dir=/path/to/fashion-iq --workdir runs/ssn_fashioniq
The freeze is `optimizer.freeze_after=('^image_encoder/',)` from step
`optimizer.freeze_after_steps` = one epoch of the three categories' training triplets.
"""
from configs import common
from configs import ssn_cirr


def get_config(arg=None):
  arg = common.parse_arg(arg, init_from="", tiny=False, steps=0)
  c = ssn_cirr.get_config(f"init_from={arg.init_from}" if arg.init_from else None)
  c.data.name = "fashioniq"
  c.data.category = "dress"
  c.data.train_categories = ("dress", "shirt", "toptee")
  c.data.caption_join = "random_forms"   # train only; evaluation always "<C1> and <c2>"
  epoch = common.steps_per_epoch(common.FASHIONIQ_TRAIN_TRIPLETS, c.batch_size)
  c.optimizer.decay_steps = tuple(e * epoch for e in (10, 20, 30, 40))
  c.optimizer.freeze_after = ("^image_encoder/",)
  c.optimizer.freeze_after_steps = epoch
  c.num_train_steps = 50 * epoch
  c.eval_every_steps = epoch
  c.checkpoint_every_steps = epoch
  c.eval.ks = (10, 50)
  c.eval.gallery_variants = ("exclude_ref", "include_ref")
  if arg.tiny:
    common.use_tiny_encoders(c, "clip_vision_tiny", "clip_text_tiny")
    c.model.composer_kwargs.width = 32
    c.model.composer_kwargs.hidden_dim = 32
    c.model.composer_kwargs.ffn_dim = 64
    c.loss.kl_weight = 1.0 / c.batch_size
  if arg.steps:
    c.num_train_steps = arg.steps
  return c
