"""`config.init_from`: pretrained Hugging Face weights into the model's towers.

Every pretrained tower of the retrieval model (an adapter of
`cir_jax.models.adapters`: image encoder, optional query image encoder, text
encoder) names its checkpoint `family`; its weights are read strictly from a
local directory with `cir_jax.pretrained` and merged at `<tower>/encoder` of the
params (and batch statistics for ResNets). The directory is `config.init_from`
(one CLIP checkpoint fills both CLIP towers) unless `config.init_from_image` /
`config.init_from_text` name one per tower (CIRPLANT: a ResNet-152 and a BERT
checkpoint). Composer heads stay freshly initialised. A checkpoint that does not
fit the configured tower is an error naming every missing / unexpected /
mis-shaped key (e.g. a ViT-B/16 checkpoint for model.image_encoder='clip_vit_b32').
"""
import jax

from cir_jax import pretrained

TOWERS = (("image_encoder", "init_from_image"), ("query_image_encoder", "init_from_image"),
          ("text_encoder", "init_from_text"))


def tower_directories(config, model) -> dict[str, tuple[str, str]]:
  """tower attribute -> (checkpoint directory, family) for every pretrained tower to load."""
  out = {}
  for attr, field in TOWERS:
    module = getattr(model, attr, None)
    family = getattr(module, "family", None)
    directory = config.get(field, "") or config.init_from
    if module is None or family is None or not directory:
      continue
    out[attr] = (directory, family)
  return out


def load_into_state(config, model, state, log=print):
  """Returns `state` with the pretrained towers' weights from their directories.

  Raises:
    ValueError: if init_from is set but the model has no pretrained tower, or a
      checkpoint does not fit its tower (strict; keys named).
  """
  towers = tower_directories(config, model)
  if not towers:
    raise ValueError(f"config.init_from={config.init_from!r} but the model has no pretrained "
                     f"tower (image_encoder={config.model.image_encoder!r}, "
                     f"text_encoder={config.model.text_encoder!r})")
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  for attr, (directory, family) in towers.items():
    module = getattr(model, attr)
    loaded = pretrained.load_variables(directory, family, module.encoder)
    variables = pretrained.merge_variables(variables, loaded, f"{attr}/encoder")
    log(f"init_from: {attr} <- {directory} ({family})")
  # Back onto the devices with the shardings of the leaves they replace.
  place = lambda new, old: jax.device_put(new, old.sharding)
  return state.replace(params=jax.tree.map(place, variables["params"], state.params),
                       batch_stats=jax.tree.map(place, variables["batch_stats"],
                                                state.batch_stats))
