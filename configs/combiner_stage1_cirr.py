"""CLIP4Cir stage 1 on CIRR: fine-tune both CLIP encoders with the element-wise sum.

CLIP4Cir (Baldrati et al., CVPR-W 2022; src/clip_fine_tune.py and its README
command): query = normalize(psi_I(ref) + psi_T(text)), target = normalize(psi_I(target)),
cross-entropy over the batch with logit scale 100, both encoders trained
(`--encoder both`), AdamW lr 2e-6 (betas 0.9/0.999, torch's weight decay 0.01),
batch 128, 100 epochs, TargetPad 1.25 preprocessing. Stage 2
(configs/combiner_cirr.py) then trains the Combiner on these encoders, frozen:
  python -m cir_jax.train --config configs/combiner_stage1_cirr.py:init_from=/ckpt/clip-vit-base-patch32 \
      --config.data.manual_dir=/path/to/cirr --workdir runs/clip4cir_stage1_cirr
  python -m cir_jax.train --config configs/combiner_cirr.py:init_from=runs/clip4cir_stage1_cirr,tokenizer=/ckpt/clip-vit-base-patch32 \
      --config.data.manual_dir=/path/to/cirr --workdir runs/clip4cir_stage2_cirr
(`init_from` a workdir copies its newest checkpoint's CLIP towers, cir_jax/init_from.py.)
Differences from CLIP4Cir, on purpose or by necessity: ViT-B/32 from a Hugging Face
directory by default (CLIP4Cir's best numbers use RN50x4: model.image_encoder=clip_rn50x4,
model.text_encoder=clip_text_rn50x4, model.embed_dim=640, data.image_size=288, with
init_from_image / init_from_text prepared from an open_clip download, docs/fidelity.md);
Adam eps 1e-8 (theirs 1e-7); float32 (theirs mixed precision).
Tests use `:tiny` (tiny random towers, 32 px).
"""
from configs import combiner_cirr
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, init_from="", tiny=False, steps=0)
  c = combiner_cirr.get_config(f"init_from={arg.init_from}" if arg.init_from else None)
  c.model.composer = "clip4cir_sum"
  c.model.frozen_image_encoder = False   # stage 1: both CLIP encoders are fine-tuned
  c.model.frozen_text_encoder = False
  c.optimizer.freeze = ()
  c.optimizer.learning_rate = 2e-6
  c.optimizer.weight_decay = 0.01        # torch.optim.AdamW's default
  c.batch_size = 128
  epoch = common.steps_per_epoch(common.CIRR_TRAIN_TRIPLETS, c.batch_size)
  c.num_train_steps = 100 * epoch
  c.eval_every_steps = epoch             # --validation-frequency 1
  c.checkpoint_every_steps = epoch
  c.log_every_steps = 50
  if arg.tiny:
    common.use_tiny_encoders(c, "clip_vision_tiny", "clip_text_tiny")
  if arg.steps:
    c.num_train_steps = arg.steps
  return c
