"""Converts a torchvision ResNet state dict into a `microsoft/resnet-18`-layout directory.

google/tirg starts its image encoder from `torchvision.models.resnet18(pretrained=True)`.
No model hub is reachable from our runs, so bring the file yourself (torchvision's
ImageNet weights are `resnet18-f37072fd.pth`) and convert it once:

  python tools/convert_torchvision_resnet.py resnet18-f37072fd.pth /ckpt/tv-resnet-18
  python -m cir_jax.train --config configs/tirg_fashion200k.py \
      --config.init_from=/ckpt/tv-resnet-18 ...

The output is what transformers' `ResNetForImageClassification.save_pretrained`
writes (config.json + model.safetensors, keys `resnet.embedder...`,
`resnet.encoder.stages.{s}.layers.{b}.layer.{k}...`, `classifier.1.*` for the
ImageNet fc), so `cir_jax.pretrained` (family 'resnet') and transformers both
read it. The architectures are the same: torchvision's BasicBlock / Bottleneck
(stride on the 3x3 conv, "v1.5") with a 1x1 conv + BN `downsample` are HF's
layers with a `shortcut`; every conv has padding k // 2; BN eps 1e-5.

Input: a state dict saved with `torch.save(model.state_dict(), path)` (.pth / .pt;
needs torch), or a .safetensors file with torchvision's key names (no torch).
A .pth file is read with `torch.load(..., weights_only=True)`: torch's restricted
unpickler, which rebuilds tensors and plain containers only and refuses any
other object, so the file cannot run code. A full pickled model (not a state
dict) is refused for the same reason.
"""
import argparse
import json
import os
import re
import sys

import numpy as np
import safetensors.numpy

_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.(.+)$")
_STEM = {"conv1": "resnet.embedder.embedder.convolution", "bn1": "resnet.embedder.embedder.normalization",
         "fc": "classifier.1"}


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """torchvision key -> array, from a .safetensors file or a torch state dict (.pth / .pt)."""
  if path.endswith(".safetensors"):
    return safetensors.numpy.load_file(path)
  import torch  # pylint: disable=g-import-not-at-top  (only needed for .pth input)
  # weights_only=True: restricted unpickler, tensors and containers only (no code runs).
  state = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict; save "
                     f"model.state_dict() instead of the model")
  state = {_strip_prefix(k): v for k, v in state.items()}
  # numpy has no bfloat16: such weights are widened to float32.
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().cpu().numpy()
          for k, v in state.items()}


def _strip_prefix(key: str) -> str:
  return key[len("module."):] if key.startswith("module.") else key  # DataParallel saves


def hf_name(key: str) -> str:
  """torchvision key -> ResNetForImageClassification key (ValueError if unknown)."""
  head, _, leaf = key.rpartition(".")
  if head in _STEM:
    return f"{_STEM[head]}.{leaf}"
  match = _BLOCK.match(key)
  if match:
    stage, block, rest = int(match[1]) - 1, int(match[2]), match[3]
    prefix = f"resnet.encoder.stages.{stage}.layers.{block}"
    part = re.match(r"^(conv|bn)(\d)\.(\w+)$", rest)
    if part:
      kind = "convolution" if part[1] == "conv" else "normalization"
      return f"{prefix}.layer.{int(part[2]) - 1}.{kind}.{part[3]}"
    part = re.match(r"^downsample\.([01])\.(\w+)$", rest)
    if part:
      return f"{prefix}.shortcut.{'convolution' if part[1] == '0' else 'normalization'}.{part[2]}"
  raise ValueError(f"unexpected key {key!r}: not a torchvision ResNet state dict key")


def resnet_config(state: dict[str, np.ndarray]) -> dict:
  """The transformers ResNetConfig (as config.json) of a torchvision ResNet state dict."""
  if "conv1.weight" not in state:
    raise ValueError(f"no 'conv1.weight': not a torchvision ResNet state dict "
                     f"(first keys: {sorted(state)[:5]})")
  blocks = sorted({(int(m[1]), int(m[2])) for m in map(_BLOCK.match, state) if m})
  stages = sorted({s for s, _ in blocks})
  if stages != list(range(1, len(stages) + 1)):
    raise ValueError(f"torchvision stages must be layer1..layerN, found {stages}")
  bottleneck = any(k.endswith(".conv3.weight") for k in state)
  last_conv = "conv3" if bottleneck else "conv2"
  config = {
      "model_type": "resnet",
      "architectures": ["ResNetForImageClassification"],
      "num_channels": int(state["conv1.weight"].shape[1]),
      "embedding_size": int(state["conv1.weight"].shape[0]),
      "hidden_sizes": [int(state[f"layer{s}.0.{last_conv}.weight"].shape[0]) for s in stages],
      "depths": [sum(1 for t, _ in blocks if t == s) for s in stages],
      "layer_type": "bottleneck" if bottleneck else "basic",
      "hidden_act": "relu",
      "downsample_in_first_stage": False,
      "downsample_in_bottleneck": False,
  }
  if "fc.weight" in state:
    classes = int(state["fc.weight"].shape[0])
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(classes)}
    config["label2id"] = {f"LABEL_{i}": i for i in range(classes)}
  return config


def convert(state: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
  """torchvision state dict -> (config.json dict, tensors by HF name)."""
  config = resnet_config(state)
  # np.array, not np.ascontiguousarray: that would turn 0-d num_batches_tracked into [1].
  tensors = {hf_name(k): np.array(v, order="C") for k, v in state.items()}
  return config, tensors


def write_directory(state: dict[str, np.ndarray], directory: str, force: bool = False) -> dict:
  """Writes config.json and model.safetensors of `state` into `directory`; returns the config."""
  config, tensors = convert(state)
  os.makedirs(directory, exist_ok=True)
  target = os.path.join(directory, "model.safetensors")
  if os.path.exists(target) and not force:
    raise FileExistsError(f"{target} exists; pass --force to overwrite")
  safetensors.numpy.save_file(tensors, target, metadata={"format": "pt"})
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return config


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("state_dict", help="torchvision state dict: .pth/.pt or .safetensors")
  parser.add_argument("output_dir", help="directory for config.json + model.safetensors")
  parser.add_argument("--force", action="store_true", help="overwrite an existing conversion")
  args = parser.parse_args(argv)
  config = write_directory(read_state_dict(args.state_dict), args.output_dir, args.force)
  print(f"wrote {args.output_dir}: {config['layer_type']} ResNet, depths {config['depths']}, "
        f"widths {config['hidden_sizes']}")


if __name__ == "__main__":
  sys.exit(main())
