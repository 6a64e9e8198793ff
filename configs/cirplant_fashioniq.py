"""CIRPLANT (Liu et al., ICCV 2021, Table 4) on FashionIQ: the model, loss and optimiser of
configs/cirplant_cirr.py (in-batch negatives only; FashionIQ has no image sets) on the three
categories, evaluated on dress val during training; `cir_jax.evaluate` scores all three:
  python -m cir_jax.train --config configs/cirplant_fashioniq.py:init_from_text=/ckpt/oscar-base,init_from_image=/ckpt/resnet-152 \
      --config.data.manual_dir=/path/to/fashion-iq --workdir runs/cirplant_fashioniq
  python -m cir_jax.evaluate --config configs/cirplant_fashioniq.py:init_from_text=/ckpt/oscar-base,init_from_image=/ckpt/resnet-152 \
      --config.data.manual_dir=/path/to/fashion-iq --workdir runs/cirplant_fashioniq

The paper gives no FashionIQ-specific schedule; this uses its CIRR settings (AdamW 1e-5,
linear decay, batch 32, 300 epochs of the 18,000 training triplets) and CLIP4Cir's caption
handling (our choice, docs/fidelity.md "CIRPLANT"). Arguments as configs/cirplant_cirr.py
(`set_negatives` is refused: FashionIQ has no image sets).
"""
from configs import common
from configs import cirplant_cirr


def get_config(arg=None):
  arg = cirplant_cirr.cirplant_args(arg)
  if arg.set_negatives:
    raise ValueError("cirplant_fashioniq: set_negatives needs CIRR's image sets; FashionIQ "
                     "has none, leave it at 0")
  c = common.base_config()
  c.data.name = "fashioniq"
  c.data.image_size = 224
  c.data.train_split = "train"
  c.data.eval_split = "val"
  c.data.category = "dress"
  c.data.train_categories = ("dress", "shirt", "toptee")
  c.data.caption_join = "random_forms"   # train only; evaluation always "<C1> and <c2>"
  c.data.max_text_len = 40
  c.data.tokenizer = arg.init_from_text or "vocab"
  c.eval.ks = (10, 50)
  c.eval.gallery_variants = ("exclude_ref", "include_ref")
  cirplant_cirr.apply_cirplant(c, arg)
  epoch = common.steps_per_epoch(common.FASHIONIQ_TRAIN_TRIPLETS, c.batch_size)
  c.num_train_steps = 300 * epoch
  c.eval_every_steps = 10 * epoch
  c.checkpoint_every_steps = 10 * epoch
  c.log_every_steps = 100
  return cirplant_cirr.finish(c, arg)
