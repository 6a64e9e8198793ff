"""The ResNet of cir_jax (NHWC, Flax Linen), in the layout of transformers' `ResNetModel`.

One implementation serves every ResNet: trained from scratch (the TIRG family's
`resnet18` / `resnet_small` / `resnet_tiny`, CPU demos) or loaded from a local
checkpoint directory (`config.init_from`, `cir_jax.init_from`). Checkpoints in
the layout of `microsoft/resnet-18` / `microsoft/resnet-50` (and ResNet-152)
load one to one through `cir_jax.pretrained`; a torchvision `resnet18` state
dict is converted to that layout by `tools/convert_torchvision_resnet.py`
(same architecture: see its docstring). Submodules carry the
PyTorch attribute names, e.g. `encoder.stages.2.layers.0.shortcut.convolution.weight`
becomes `encoder/stages_2/layers_0/shortcut/convolution/kernel` (OIHW -> HWIO) and
`...normalization.running_mean` becomes `batch_stats/.../normalization/mean`.

The layout equals torchvision's ResNet: the stride of a bottleneck's first
block sits on the 3x3 convolution (`downsample_in_bottleneck` False, "ResNet
v1.5", as torchvision), and every convolution has padding kernel // 2.

Two hooks beyond the checkpoint layout: `conv_impl` picks the lowering of every
convolution (cir_jax/models/conv.py; the model builder resolves 'auto' once with
the image size), and `modulate(block, num_blocks, x)` is called on the output of
every residual block, the hook FiLM uses to inject text into each block.
"""
import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cir_jax.models import batch_norm  # x * a + c: no centred copy of x for autodiff
from cir_jax.models import conv as conv_lib  # CPU-fast lowering, same params as nn.Conv


class ConvLayer(nn.Module):
  """conv (no bias, padding k // 2) -> BatchNorm -> optional ReLU (HF ResNetConvLayer)."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  activation: bool = True
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  zero_scale: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    """[B, H, W, C] -> [B, H / stride, W / stride, features]."""
    pad = self.kernel_size // 2
    x = conv_lib.Conv(self.features, (self.kernel_size, self.kernel_size), (self.stride, self.stride),
                      padding=((pad, pad), (pad, pad)), use_bias=False, dtype=self.dtype,
                      param_dtype=jnp.float32, conv_impl=self.conv_impl, name="convolution")(x)
    # torch momentum 0.1 == flax momentum 0.9; eps as torch's BatchNorm2d.
    scale_init = nn.initializers.zeros if self.zero_scale else nn.initializers.ones
    x = batch_norm.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                              dtype=self.dtype, param_dtype=jnp.float32, scale_init=scale_init,
                              name="normalization")(x)
    return nn.relu(x) if self.activation else x


class BottleNeckLayer(nn.Module):
  """1x1 reduce -> 3x3 -> 1x1 expand, plus (projected) residual, ReLU."""
  features: int
  stride: int = 1
  reduction: int = 4
  downsample_in_bottleneck: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    """[B, H, W, C] -> [B, H / stride, W / stride, features]."""
    conv = functools.partial(ConvLayer, dtype=self.dtype, conv_impl=self.conv_impl)
    residual = x
    if x.shape[-1] != self.features or self.stride != 1:
      # HF ResNetShortCut: 1x1 projection + BatchNorm, no activation.
      residual = conv(self.features, 1, self.stride, activation=False, name="shortcut")(x, train)
    reduced = self.features // self.reduction
    first_stride = self.stride if self.downsample_in_bottleneck else 1
    y = conv(reduced, 1, first_stride, name="layer_0")(x, train)
    y = conv(reduced, 3, self.stride // first_stride, name="layer_1")(y, train)
    y = conv(self.features, 1, activation=False, zero_scale=self.zero_init_residual,
             name="layer_2")(y, train)
    return nn.relu(y + residual)


class BasicLayer(nn.Module):
  """Two 3x3 convolutions plus (projected) residual, ReLU (ResNet-18/34)."""
  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    """[B, H, W, C] -> [B, H / stride, W / stride, features]."""
    conv = functools.partial(ConvLayer, dtype=self.dtype, conv_impl=self.conv_impl)
    residual = x
    if x.shape[-1] != self.features or self.stride != 1:
      # HF ResNetShortCut: 1x1 projection + BatchNorm, no activation.
      residual = conv(self.features, 1, self.stride, activation=False, name="shortcut")(x, train)
    y = conv(self.features, 3, self.stride, name="layer_0")(x, train)
    y = conv(self.features, 3, activation=False, zero_scale=self.zero_init_residual,
             name="layer_1")(y, train)
    return nn.relu(y + residual)


class Stage(nn.Module):
  """Blocks `layers_{i}`; only the first one changes width/stride."""
  features: int
  depth: int
  stride: int
  block_kwargs: dict
  bottleneck: bool = True
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False, modulate=None, first_block: int = 0,
               num_blocks: int = 0):
    """[B, H, W, C] -> [B, H / stride, W / stride, features].

    `modulate(block, num_blocks, x)` (optional) is applied to the output of each
    block; `block` counts over the whole network from `first_block`.
    """
    block_cls = BottleNeckLayer if self.bottleneck else BasicLayer
    if self.remat:
      # `train` switches BatchNorm's mode: a static Python bool under remat.
      block_cls = nn.remat(block_cls, static_argnums=(2,))
    for i in range(self.depth):
      x = block_cls(self.features, stride=self.stride if i == 0 else 1, **self.block_kwargs,
                    name=f"layers_{i}")(x, train)
      if modulate is not None:
        x = modulate(first_block + i, num_blocks, x)
    return x


class Embeddings(nn.Module):
  """7x7/2 conv + BatchNorm + ReLU, then 3x3/2 max-pool (HF ResNetEmbeddings)."""
  embedding_size: int = 64
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, images, train: bool = False):
    """[B, H, W, C] -> [B, H / 4, W / 4, embedding_size]."""
    x = ConvLayer(self.embedding_size, 7, 2, dtype=self.dtype, conv_impl=self.conv_impl,
                  name="embedder")(images.astype(self.dtype), train)
    # -inf padding, as torch's MaxPool2d; the slice lowering under 'matmul'/'mixed'
    # (XLA:CPU's select-and-scatter gradient is slow, conv.max_pool).
    return conv_lib.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), self.conv_impl)


class Encoder(nn.Module):
  """The stages `stages_{i}` (HF ResNetEncoder)."""
  depths: Sequence[int]
  hidden_sizes: Sequence[int]
  block_kwargs: dict
  bottleneck: bool = True
  downsample_in_first_stage: bool = False
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False, modulate=None):
    """[B, H, W, C] -> [B, H / 8, W / 8, hidden_sizes[-1]] (4 stages, standard layout)."""
    num_blocks, first = sum(self.depths), 0
    for i, (features, depth) in enumerate(zip(self.hidden_sizes, self.depths)):
      stride = 2 if i > 0 or self.downsample_in_first_stage else 1
      x = Stage(features, depth, stride, self.block_kwargs, self.bottleneck, self.remat,
                name=f"stages_{i}")(x, train, modulate, first, num_blocks)
      first += depth
    return x


class HFResNet(nn.Module):
  """ResNet trunk with HF `ResNetModel` parameter names.

  Attributes:
    depths: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    hidden_sizes: output channels per stage, e.g. (256, 512, 1024, 2048).
    embedding_size: channels of the 7x7 stem.
    layer_type: 'bottleneck' or 'basic'.
    downsample_in_first_stage: stride 2 in the first stage (False in HF ResNets).
    downsample_in_bottleneck: stride on the first 1x1 instead of the 3x3.
    dtype: compute dtype; parameters and batch statistics stay float32.
    remat: rematerialise each residual block in the backward pass.
    conv_impl: lowering of every convolution, 'auto' | 'xla' | 'matmul'
      (cir_jax/models/conv.py); 'auto' left here is resolved with the input size.
    zero_init_residual: initialise the last BatchNorm scale of every block to 0
      so each block starts as the identity (Goyal et al. 2017; torchvision's
      `zero_init_residual`). Only matters from scratch: loaded weights replace it.
  """
  depths: Sequence[int] = (3, 4, 6, 3)
  hidden_sizes: Sequence[int] = (256, 512, 1024, 2048)
  embedding_size: int = 64
  layer_type: str = "bottleneck"
  downsample_in_first_stage: bool = False
  downsample_in_bottleneck: bool = False
  dtype: Any = jnp.float32
  remat: bool = False
  conv_impl: str = "auto"
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, images, train: bool = False,
               modulate: Optional[Callable[[int, int, jnp.ndarray], jnp.ndarray]] = None):
    """Encodes images.

    Args:
      images: float [B, H, W, C] (NHWC), ImageNet-normalised.
      train: BatchNorm uses batch statistics and updates `batch_stats` if True
        (apply with mutable=['batch_stats']); otherwise the running averages.
      modulate: optional `f(block, num_blocks, x) -> x` applied to the output
        [B, h, w, C] of every residual block, `block` in [0, num_blocks) over
        the whole network (the hook FiLM uses to inject text).

    Returns:
      (pooled [B, hidden_sizes[-1]] float32, aux) with aux 'pooled' and
      'feature_map' [B, h, w, hidden_sizes[-1]] float32 (HF `last_hidden_state`,
      NHWC; h = H / 32 for the standard layout).
    """
    if self.layer_type not in ("bottleneck", "basic"):
      raise ValueError(f"layer_type must be 'bottleneck' or 'basic', got {self.layer_type!r}")

    conv_impl = conv_lib.resolve_conv_impl(self.conv_impl, images.shape[1] * images.shape[2])
    x = Embeddings(self.embedding_size, dtype=self.dtype, conv_impl=conv_impl,
                   name="embedder")(images, train)
    block_kwargs = {"dtype": self.dtype, "conv_impl": conv_impl,
                    "zero_init_residual": self.zero_init_residual}
    if self.layer_type == "bottleneck":
      block_kwargs["downsample_in_bottleneck"] = self.downsample_in_bottleneck
    x = Encoder(self.depths, self.hidden_sizes, block_kwargs, self.layer_type == "bottleneck",
                self.downsample_in_first_stage, self.remat, name="encoder")(x, train, modulate)
    feature_map = x.astype(jnp.float32)
    pooled = feature_map.mean(axis=(1, 2))
    return pooled, {"pooled": pooled, "feature_map": feature_map}


ResNet18 = functools.partial(HFResNet, depths=(2, 2, 2, 2), hidden_sizes=(64, 128, 256, 512),
                             layer_type="basic")
ResNet34 = functools.partial(HFResNet, depths=(3, 4, 6, 3), hidden_sizes=(64, 128, 256, 512),
                             layer_type="basic")
ResNet50 = functools.partial(HFResNet, depths=(3, 4, 6, 3))
ResNet101 = functools.partial(HFResNet, depths=(3, 4, 23, 3))
ResNet152 = functools.partial(HFResNet, depths=(3, 8, 36, 3))
ResNetTiny = functools.partial(HFResNet, depths=(1, 2), hidden_sizes=(16, 32), embedding_size=8)
# Trained-from-scratch variants for CPU runs (identity-initialised blocks):
# a narrow ResNet-10 (~1/8 of ResNet-18's FLOPs) and a two-stage toy for tests.
ResNetSmall = functools.partial(HFResNet, depths=(1, 1, 1, 1), hidden_sizes=(32, 64, 128, 256),
                                embedding_size=32, layer_type="basic", zero_init_residual=True)
ResNetBasicTiny = functools.partial(HFResNet, depths=(1, 1), hidden_sizes=(8, 16),
                                    embedding_size=8, layer_type="basic",
                                    zero_init_residual=True)
