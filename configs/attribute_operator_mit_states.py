"""Attribute as Operator on MIT-States retrieval (TIRG paper Table 2, "Att. as Operator"):
configs/tirg_mit_states.py (49 held-out nouns, soft triplet K = 2, ResNet-18, LSTM) with the
text as a matrix acting on the image feature, T_t phi_x:
  python -m cir_jax.train --config configs/attribute_operator_mit_states.py \
      --config.data.manual_dir=/path/to/mit_states --workdir runs/aop_mit_states

Differences (docs/fidelity.md "Configs"): Nagarajan and Grauman give each attribute its own
matrix initialised to I; here T_t = I + reshape(fc(phi_t)) is predicted from the LSTM
feature of the adjective (the composer takes free text), which for MIT-States' one-word
texts is one matrix per adjective too, but shares weights across adjectives. `rank=r`
uses an identity-plus-rank-r operator instead of the full d x d matrix (134M fc weights).
"""
from configs import common
from configs import tirg_mit_states


def get_config(arg=None):
  arg = common.parse_arg(arg, rank=0, steps=0)
  c = tirg_mit_states.get_config(f"steps={arg.steps}" if arg.steps else None)
  c.model.composer = "attribute_operator"
  c.model.composer_kwargs.rank = arg.rank
  return c
