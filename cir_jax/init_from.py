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

A directory may also be a training workdir of this library (one with
checkpoints/, or that checkpoints/ folder): its newest complete checkpoint's
`<tower>` params and batch statistics are copied whole into the same towers
(CLIP4Cir's hand-over: stage 1 fine-tunes CLIP with the element-wise sum,
stage 2 trains the Combiner on those towers, frozen). Every other parameter
(the composer, the scale) stays freshly initialised; the step restarts at 0.
"""
import pathlib
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from cir_jax import checkpoint
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
    saved = workdir_checkpoint(directory)
    if saved is not None:
      variables = _copy_tower(variables, attr, saved, directory, log)
      continue
    module = getattr(model, attr)
    loaded = pretrained.load_variables(directory, family, module.encoder)
    variables = pretrained.merge_variables(variables, loaded, f"{attr}/encoder")
    log(f"init_from: {attr} <- {directory} ({family})")
  # Back onto the devices with the shardings of the leaves they replace.
  place = lambda new, old: jax.device_put(new, old.sharding)
  return state.replace(params=jax.tree.map(place, variables["params"], state.params),
                       batch_stats=jax.tree.map(place, variables["batch_stats"],
                                                state.batch_stats))


def workdir_checkpoint(directory) -> Optional[pathlib.Path]:
  """The checkpoints/ folder of a training workdir `directory` (or `directory` itself when
  it is one); None for anything else (a Hugging Face directory)."""
  path = pathlib.Path(directory)
  if (path / checkpoint.CHECKPOINTS).is_dir():
    return path / checkpoint.CHECKPOINTS
  if path.is_dir() and any((p / checkpoint.REQUIRED_FILES[0]).exists()
                           for p in path.iterdir() if p.name.isdigit()):
    return path
  return None


_SAVED_CACHE: dict = {}


def _read_saved(path: pathlib.Path, log) -> tuple[int, dict]:
  """(step, the saved train-state tree as host arrays) of the newest complete step."""
  with ocp.CheckpointManager(path) as manager:
    step = checkpoint.latest_complete_step(manager, log)
  if step is None:
    raise FileNotFoundError(f"init_from: no complete checkpoint in {path}")
  key = (str(path.absolute()), step)
  if key not in _SAVED_CACHE:  # one read for several towers of one workdir
    _SAVED_CACHE.clear()
    item = path / str(step) / checkpoint.ITEM
    tree = ocp.StandardCheckpointHandler().metadata(item)
    tree = getattr(tree, "tree", tree)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            tree)
    restored = ocp.StandardCheckpointer().restore(item, abstract)
    _SAVED_CACHE[key] = jax.tree.map(np.asarray, restored)
  return step, _SAVED_CACHE[key]


def _copy_tower(variables: dict, attr: str, path: pathlib.Path, directory, log) -> dict:
  """`variables` with params/batch_stats[attr] replaced by the workdir checkpoint's."""
  step, saved = _read_saved(path, log)
  out = dict(variables)
  for collection in ("params", "batch_stats"):
    current = variables.get(collection) or {}
    if attr not in current:
      continue
    stored = (saved.get(collection) or {}).get(attr)
    if stored is None:
      raise ValueError(f"init_from={directory!r}: its checkpoint (step {step}) has no "
                       f"{collection}/{attr}; was it trained with this tower?")
    want = checkpoint._flat_shapes(current[attr])  # pylint: disable=protected-access
    have = checkpoint._flat_shapes(stored)  # pylint: disable=protected-access
    differences = checkpoint.tree_differences(have, want)
    if differences:
      raise ValueError(f"init_from={directory!r} (step {step}): {collection}/{attr} does not "
                       f"fit this config's tower:\n  " + "\n  ".join(differences))
    out[collection] = {**current, attr: jax.tree.map(
        lambda new, old: np.asarray(new, dtype=old.dtype), stored, current[attr])}
  log(f"init_from: {attr} <- {path} step {step} (a workdir of this library)")
  return out
