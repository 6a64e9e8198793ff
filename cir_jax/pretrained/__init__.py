"""Hugging Face-format checkpoints (safetensors + config.json) -> our Flax variables.

No model hub is reachable, so weights come from a LOCAL directory as written by
`save_pretrained`: `config.json` plus `model.safetensors`, or shards
`model-0000i-of-0000n.safetensors` listed in `model.safetensors.index.json`. They
are read with `safetensors.numpy` (never torch, never pickle) and mapped onto
the modules of `cir_jax.models.{clip,bert,hf_resnet}`, whose submodules carry
the PyTorch attribute names. The mapping is mechanical:

  `encoder.layers.3.mlp.fc1.weight` -> `params/encoder/layers_3/mlp/fc1/kernel`

with the leaf renamed by what the Flax module at that path holds: Linear
`weight` [out, in] -> `kernel` [in, out]; Conv `weight` OIHW -> `kernel` HWIO;
Embedding `weight` -> `embedding`; LayerNorm/BatchNorm `weight` (or `gamma`)
-> `scale`, `bias` (or `beta`) -> `bias`; BatchNorm `running_mean/var` ->
`batch_stats/.../mean|var`. Known heads of HF task models (`cls.*`,
`classifier.*`), the other CLIP tower and persistent id buffers are skipped;
anything else that does not fit is an error. Loading is STRICT: the converted
tree must equal the module's (from `jax.eval_shape` of its init) key for key and
shape for shape, or a ValueError names the directory and the first missing keys,
unexpected keys and shape mismatches.

Families (`FAMILIES`): 'clip_vision', 'clip_text' (from a CLIPModel,
CLIP{Vision,Text}Model or *WithProjection checkpoint), 'bert' (BertModel or
BertFor* checkpoints) and 'resnet' (ResNetModel / ResNetForImageClassification).

Typical use:

  module, variables = pretrained.load_pretrained('/ckpt/clip-vit-base-patch32', 'clip_vision')
  params = pretrained.merge_params(params, variables['params'], 'image_encoder')
"""
from cir_jax.pretrained.convert import convert_state
from cir_jax.pretrained.convert import load_pretrained
from cir_jax.pretrained.convert import load_variables
from cir_jax.pretrained.convert import module_from_config
from cir_jax.pretrained.families import FAMILIES
from cir_jax.pretrained.families import Family
from cir_jax.pretrained.files import CONFIG_NAME
from cir_jax.pretrained.files import INDEX_NAME
from cir_jax.pretrained.files import read_config
from cir_jax.pretrained.files import read_state
from cir_jax.pretrained.files import tensor_shapes
from cir_jax.pretrained.files import WEIGHTS_NAME
from cir_jax.pretrained.files import weight_files
from cir_jax.pretrained.merge import merge_params
from cir_jax.pretrained.merge import merge_variables

__all__ = [
    "convert_state",
    "load_pretrained",
    "load_variables",
    "module_from_config",
    "FAMILIES",
    "Family",
    "CONFIG_NAME",
    "INDEX_NAME",
    "read_config",
    "read_state",
    "tensor_shapes",
    "WEIGHTS_NAME",
    "weight_files",
    "merge_params",
    "merge_variables",
]
