"""CLIP4Cir's Combiner on CIRR: stage 2 of CLIP4Cir (Baldrati et al., CVPR-W 2022).

Stage 2: the CLIP towers are fixed feature extractors, initialised from the
stage-1 fine-tuned CLIP (configs/combiner_stage1_cirr.py; `init_from=<its
workdir>` copies its CLIP towers); the Combiner is trained with Adam (AdamW
without decay) lr 2e-5, batch 4096, 300 epochs, cross-entropy with logit scale
100, TargetPad 1.25 preprocessing (CLIP4Cir's README command; its widths:
projection 4x, hidden 8x the CLIP width).
`init_from` the original CLIP checkpoint instead skips stage 1: a Combiner on
frozen, NOT fine-tuned CLIP, an ablation of ours. It is not SSN's "Baseline"
(SSN's baseline fine-tunes CLIP) nor CLIP4Cir's full method.
ViT-B/32 here (CLIP4Cir's best numbers use RN50x4: model.image_encoder=clip_rn50x4,
model.text_encoder=clip_text_rn50x4, model.embed_dim=640, data.image_size=288, weights from
open_clip, see docs/fidelity.md):
  python -m cir_jax.train --config configs/combiner_cirr.py:init_from=runs/clip4cir_stage1_cirr,tokenizer=/ckpt/clip-vit-base-patch32 \
      --config.data.manual_dir=/path/to/cirr --workdir runs/clip4cir_stage2_cirr
(`tokenizer=` names the CLIP directory whose tokenizer files to use; default init_from.)
Tests use `:tiny` (tiny random towers, 32 px).
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, init_from="", tokenizer="", tiny=False, steps=0)
  c = common.base_config()
  # The tokenizer files are in the CLIP checkpoint directory (default: init_from).
  common.cirr_pretrained_data(c, arg.tokenizer or arg.init_from, max_text_len=77)
  c.init_from = arg.init_from
  c.data.preprocess = "targetpad"   # CLIP4Cir's --transform targetpad --target-ratio 1.25
  c.data.target_pad_ratio = 1.25
  c.model.image_encoder = "clip_vit_b32"
  c.model.text_encoder = "clip_text"
  c.model.composer = "combiner"
  c.model.embed_dim = 512
  c.model.frozen_image_encoder = True   # stage 2: CLIP features are fixed
  c.model.frozen_text_encoder = True
  c.model.learn_scale = False
  c.model.init_scale = 1.0
  c.loss.name = "temperature_ce"
  c.loss.temperature = 0.01
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 2e-5
  c.optimizer.weight_decay = 0.0        # CLIP4Cir uses torch.optim.Adam
  c.optimizer.freeze = ("^image_encoder/", "^text_encoder/")
  c.batch_size = 4096
  epoch = common.steps_per_epoch(common.CIRR_TRAIN_TRIPLETS, c.batch_size)
  c.num_train_steps = 300 * epoch
  c.eval_every_steps = 5 * epoch
  c.checkpoint_every_steps = 5 * epoch
  c.log_every_steps = epoch
  if arg.tiny:
    common.use_tiny_encoders(c, "clip_vision_tiny", "clip_text_tiny")
  if arg.steps:
    c.num_train_steps = arg.steps
  return c
