"""Reading a local Hugging Face-format directory: config.json and safetensors (never pickle)."""
import json
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import safe_open
import safetensors.numpy

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"



def read_config(directory: str) -> dict:
  """Returns the parsed `config.json` of a checkpoint directory."""
  path = os.path.join(directory, CONFIG_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint directory {directory!r} "
                            f"(found: {_listing(directory)})")
  with open(path) as f:
    return json.load(f)


def weight_files(directory: str) -> list[str]:
  """Paths of the safetensors files of a checkpoint (one file, or the shards of the index)."""
  single = os.path.join(directory, WEIGHTS_NAME)
  if os.path.isfile(single):
    return [single]
  index = os.path.join(directory, INDEX_NAME)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not weight_map:
      raise ValueError(f"{index} has no 'weight_map'")
    files = sorted(set(weight_map.values()))
    absent = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
    if absent:
      raise FileNotFoundError(f"{index} lists shards missing from {directory!r}: {absent}")
    return [os.path.join(directory, name) for name in files]
  raise FileNotFoundError(
      f"no weights in checkpoint directory {directory!r}: looked for {WEIGHTS_NAME} and "
      f"{INDEX_NAME} (found: {_listing(directory)}). Only safetensors are read; convert "
      f"pytorch_model.bin with `save_pretrained(..., safe_serialization=True)` elsewhere.")


def _listing(directory: str) -> list[str]:
  if not os.path.isdir(directory):
    return ["<directory does not exist>"]
  return sorted(os.listdir(directory))[:20]


def _read_raw(path: str) -> dict[str, np.ndarray]:
  """Reads a safetensors file by its documented layout (used for BF16, which numpy lacks).

  Layout: u64 little-endian header size, a JSON header {name: {dtype, shape,
  data_offsets}}, then the raw little-endian bytes.
  """
  dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32,
            "F64": np.float64, "I64": np.int64, "I32": np.int32, "I16": np.int16,
            "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    out[name] = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
  return out


def read_state(directory: str) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory by their PyTorch names."""
  state = {}
  for path in weight_files(directory):
    try:
      state.update(safetensors.numpy.load_file(path))
    except TypeError:  # "data type 'bfloat16' not understood"
      state.update(_read_raw(path))
  return state


def tensor_shapes(directory: str) -> dict[str, tuple[int, ...]]:
  """Names and shapes of a checkpoint's tensors, from the headers only (cheap)."""
  shapes = {}
  for path in weight_files(directory):
    with safe_open(path, framework="numpy") as f:
      for key in f.keys():
        shapes[key] = tuple(f.get_slice(key).get_shape())
  return shapes
