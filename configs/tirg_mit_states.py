"""TIRG (fc-level) on MIT-States with the TIRG paper's settings (section 4.2, Tables 2-3).

manual_dir must hold images/<adj> <noun>/*.jpg (the MIT-States release); for the
classification split also compositional-split/{train,test}_pairs.txt
(see cir_jax/data/mit_states.py).
Retrieval (49 held-out nouns, R@1/5/10; soft triplet K = 2):
  python -m cir_jax.train --config configs/tirg_mit_states.py --config.init_from=/ckpt/resnet-18 \
      --config.data.manual_dir=/path/to/mit_states --workdir runs/tirg_mit_states
Classification with compositionally novel labels (Table 3) as published: learned noun
and adjective embeddings composed by TIRG, images classified by the nearest composed
unseen pair (cir_jax.mit_states_classification.train_table3; the image tower from
scratch, see docs/fidelity.md "MIT-States Table 3"):
  python -m cir_jax.mit_states_classification --config configs/tirg_mit_states.py:table3 \
      --config.data.manual_dir=/path/to/mit_states --workdir runs/tirg_mit_states_table3
Our prototype variant instead trains the retrieval model on the pair split
(`:compositional`) and scores it with
cir_jax.mit_states_classification.evaluate_prototype_variant.

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
  arg = common.parse_arg(arg, compositional=False, table3=False, steps=0)
  c = common.base_config()
  c.data.name = "mit_states"
  c.data.image_size = 224
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.pairs_per_image = 4
  compositional = arg.compositional or arg.table3
  c.data.mit_states_split = "compositional" if compositional else "tirg"
  c.model.composer = "tirg"
  common.tirg_resnet18(c, real_images=True)
  c.loss.name = "soft_triplet"    # K = 2 (Eq. 5)
  c.batch_size = 32
  c.num_train_steps = 150_000
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 5_000
  c.log_every_steps = 100
  c.eval.ks = (1, 5, 10)
  if arg.steps:
    c.num_train_steps = arg.steps
  return c
