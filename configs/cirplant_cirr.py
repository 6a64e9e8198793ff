"""CIRPLANT (Liu et al., ICCV 2021) on CIRR with the paper's settings (section 5).

ImageNet ResNet-152 pooled features (fixed) -> learned FC + L2 norm -> one image
token after the BERT text tokens; the output at that token is the query; soft
triplet loss with squared L2 distance (TIRG Eq. 5), in-batch negatives plus each
query's image-set members (loss.set_negatives); AdamW lr 1e-5 with a linear
decay to 0 and no warm-up, weight decay 0.05 and max 40 text tokens (the authors'
run script), batch 32, 300 epochs. The transformer starts from a BERT-layout
checkpoint (the paper uses OSCAR base-vg-labels; any BertModel directory fits),
the image tower from `microsoft/resnet-152`:
  python -m cir_jax.train --config configs/cirplant_cirr.py:init_from_text=/ckpt/oscar-base,init_from_image=/ckpt/resnet-152 \
      --config.data.manual_dir=/path/to/cirr --workdir runs/cirplant_cirr
Tests use `:tiny`.
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, init_from_text="", init_from_image="", tiny=False, steps=0)
  c = common.base_config()
  common.cirr_pretrained_data(c, arg.init_from_text, max_text_len=40)
  c.init_from_text = arg.init_from_text
  c.init_from_image = arg.init_from_image
  c.model.image_encoder = "hf_resnet152"
  c.model.frozen_image_encoder = True     # pre-extracted ImageNet features in the paper
  c.model.text_encoder = "bert_base"
  c.model.composer = "cirplant"
  c.model.composer_kwargs.hidden_size = 768
  c.model.composer_kwargs.dropout = 0.3   # the run script's --drop_out
  c.model.embed_dim = 768
  c.model.init_scale = 4.0                # the authors' NormalizationLayer(4.0, learn_scale=True)
  c.model.learn_scale = True
  c.loss.name = "soft_triplet"
  c.loss.kernel = "neg_sq_l2"
  # "random negatives, with the image-set members as extra negatives": CIRR's img_set
  # has 6 images, minus the reference and the target leaves 4 per query.
  c.loss.set_negatives = 4
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-5
  c.optimizer.weight_decay = 0.05
  c.optimizer.momentum = 0.0
  c.optimizer.freeze = ("^image_encoder/",)
  c.optimizer.schedule = "linear"
  c.batch_size = 32
  epoch = common.steps_per_epoch(common.CIRR_TRAIN_TRIPLETS, c.batch_size)
  c.num_train_steps = 300 * epoch
  c.eval_every_steps = 10 * epoch
  c.checkpoint_every_steps = 10 * epoch
  c.log_every_steps = 100
  if arg.tiny:
    common.use_tiny_encoders(c, "hf_resnet_tiny", "bert_tiny")
    c.model.composer_kwargs.hidden_size = 32
  if arg.steps:
    c.num_train_steps = arg.steps
  c.optimizer.total_steps = c.num_train_steps
  return c
