"""Checkpoint tensors -> the Flax variables of a module (strict: key for key, shape for shape)."""
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from cir_jax.pretrained import families
from cir_jax.pretrained import files
from cir_jax.pretrained import trees
from cir_jax.pretrained.trees import Path, flatten, fmt, mismatch_report, unflatten

def _split(dotted: str) -> Path:
  """'encoder.layers.0.mlp.fc1.weight' -> ('encoder', 'layers_0', 'mlp', 'fc1', 'weight')."""
  out = []
  for part in dotted.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"  # list index -> Flax's `name_{i}` submodule
    else:
      out.append(part)
  return tuple(out)


def _to_flax(dotted: str, value: np.ndarray, expected: Mapping[Path, Any]):
  """Maps one PyTorch tensor to (variables path, array); path None = drop it."""
  *module, leaf = _split(dotted)
  params = ("params", *module)
  if leaf in ("weight", "gamma"):
    if params + ("kernel",) in expected:
      if value.ndim == 2:
        return params + ("kernel",), value.T  # Linear [out, in] -> [in, out]
      if value.ndim == 4:
        return params + ("kernel",), value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      return params + ("kernel",), value
    if params + ("embedding",) in expected:
      return params + ("embedding",), value
    if params + ("scale",) in expected:
      return params + ("scale",), value
    return params + (leaf,), value  # not in the model: reported as unexpected
  if leaf in ("bias", "beta"):
    return params + ("bias",), value
  if leaf == "running_mean":
    return ("batch_stats", *module, "mean"), value
  if leaf == "running_var":
    return ("batch_stats", *module, "var"), value
  if leaf == "num_batches_tracked":
    return None, value  # torch's BatchNorm counter; Flax uses a fixed momentum
  return params + (leaf,), value  # bare parameters: class_embedding, ...










def convert_state(state: Mapping[str, np.ndarray], family: str, module: nn.Module,
                  source: str = "<state dict>") -> dict:
  """Strictly maps PyTorch-named tensors onto `module`'s variables.

  Args:
    state: checkpoint tensors by PyTorch name (e.g. from `read_state`).
    family: a key of FAMILIES.
    module: the Flax module to fill (its shapes come from `jax.eval_shape`).
    source: where `state` came from, for error messages.

  Returns:
    Variables {'params': ..., ['batch_stats': ...]} of numpy arrays in the
    module's parameter dtypes.

  Raises:
    ValueError: naming the first missing, unexpected and mis-shaped tensors.
  """
  fam = families.get_family(family)
  shapes = jax.eval_shape(module.init, jax.random.key(0), *fam.dummy_inputs(module))
  expected = flatten(shapes)
  loaded, origin = {}, {}
  for key in sorted(state):
    dotted = fam.rename(key)
    if dotted is None:
      continue
    path, value = _to_flax(dotted, state[key], expected)
    if path is not None:
      loaded[path], origin[path] = value, key
  missing = [f"{fmt(p)} {tuple(expected[p].shape)}" for p in expected if p not in loaded]
  unexpected = [f"{origin[p]} {tuple(state[origin[p]].shape)} (-> {fmt(p)})"
                for p in loaded if p not in expected]
  mismatched = [f"{origin[p]} {tuple(state[origin[p]].shape)} -> {fmt(p)}: checkpoint gives "
                f"{tuple(loaded[p].shape)}, model expects {tuple(expected[p].shape)}"
                for p in loaded if p in expected and loaded[p].shape != expected[p].shape]
  if missing or unexpected or mismatched:
    raise ValueError(mismatch_report(
        f"checkpoint {source} does not fit {type(module).__name__} (family {family!r}):",
        missing, unexpected, mismatched))
  return unflatten({p: np.asarray(loaded[p], dtype=expected[p].dtype) for p in expected})


def module_from_config(directory: str, family: str, **overrides) -> nn.Module:
  """Builds the module described by a checkpoint's `config.json`.

  Args:
    directory: local checkpoint directory.
    family: a key of FAMILIES.
    **overrides: module attributes to set, e.g. dtype=jnp.bfloat16, remat=True.

  Returns:
    An unbound Flax module.
  """
  fam = families.get_family(family)
  config = files.read_config(directory)
  model_type = config.get("model_type")
  if model_type not in fam.model_types:
    shapes = files.tensor_shapes(directory)
    first = "; ".join(f"{k} {v}" for k, v in list(sorted(shapes.items()))[:trees.MAX_LISTED])
    raise ValueError(f"checkpoint {directory!r} has model_type {model_type!r}, but family "
                     f"{family!r} reads {list(fam.model_types)}; its first tensors: {first}")
  kwargs = fam.module_kwargs(config, list(files.tensor_shapes(directory)))
  kwargs.update(overrides)
  return fam.module_cls(**kwargs)


def load_variables(directory: str, family: str, module: nn.Module) -> dict:
  """Reads a checkpoint directory into the variables of a given `module` (strict)."""
  return convert_state(files.read_state(directory), family, module, source=repr(directory))


def load_pretrained(directory: str, family: str, **overrides) -> tuple[nn.Module, dict]:
  """Builds the module of a checkpoint directory and loads its weights.

  Args:
    directory: local directory with config.json and safetensors weights.
    family: 'clip_vision', 'clip_text', 'bert' or 'resnet'.
    **overrides: module attributes, e.g. dtype=jnp.bfloat16, remat=True.

  Returns:
    (module, variables) where variables holds numpy 'params' (and 'batch_stats'
    for ResNet).
  """
  module = module_from_config(directory, family, **overrides)
  return module, load_variables(directory, family, module)
