"""ResNet image encoders (NHWC), trained from scratch or from converted weights.

The TIRG paper (section 3, "ResNet-17") uses a ResNet-18 trunk with 512 output
channels; its spatial feature map feeds `tirg_lastconv` and its pooled feature
feeds the fc-level composers. Variants are `functools.partial`s of one class.
"""
import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cir_jax.models import conv as conv_lib

ModuleDef = Any


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""
  filters: int
  strides: int = 1
  norm: ModuleDef = nn.BatchNorm
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(conv_lib.Conv, use_bias=False, dtype=self.dtype,
                             conv_impl=self.conv_impl)
    residual = x
    y = conv(self.filters, (3, 3), (self.strides, self.strides), padding=((1, 1), (1, 1)))(x)
    y = nn.relu(self.norm()(y))
    y = conv(self.filters, (3, 3), padding=((1, 1), (1, 1)))(y)
    # Zero-init the last BN scale so each block starts as identity (Goyal et al.).
    y = self.norm(scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = conv(self.filters, (1, 1), (self.strides, self.strides), name="proj")(residual)
      residual = self.norm(name="proj_norm")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """ResNet trunk returning the last feature map and its global average.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    num_filters: channels of the first stage (doubled at each later stage).
    dtype: compute dtype (params stay float32).
    conv_impl: 'auto' | 'xla' | 'matmul' | 'mixed' (see cir_jax/models/conv.py; 'auto' picks per
      layer on CPU for images up to 128 px: matmuls where XLA's native
      convolutions are slow, i.e. small feature maps).
  """
  stage_sizes: Sequence[int]
  num_filters: int = 64
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, images, train: bool = False,
               modulate: Optional[Callable[[int, jnp.ndarray], jnp.ndarray]] = None):
    """Encodes images.

    Args:
      images: float [B, H, W, 3], already normalised.
      train: BatchNorm uses batch statistics (global over the sharded batch) if True.
      modulate: optional `f(stage_index, feature_map) -> feature_map` applied at the
        end of every stage (the hook FiLM-style composers use to inject text).

    Returns:
      dict with 'feature_map' [B, h, w, C] and 'pooled' [B, C] (float32).
    """
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    conv_impl = conv_lib.resolve_conv_impl(self.conv_impl, images.shape[1] * images.shape[2])
    x = images.astype(self.dtype)
    x = conv_lib.Conv(self.num_filters, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                      dtype=self.dtype, conv_impl=conv_impl, name="stem_conv")(x)
    x = nn.relu(norm(name="stem_norm")(x))
    x = conv_lib.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), conv_impl)
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.num_filters * 2**stage, strides=strides, norm=norm,
                       dtype=self.dtype, conv_impl=conv_impl,
                       name=f"stage{stage}_block{block}")(x)
      if modulate is not None:
        x = modulate(stage, x)
    feature_map = x.astype(jnp.float32)
    return {"feature_map": feature_map, "pooled": feature_map.mean(axis=(1, 2))}


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), num_filters=64)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), num_filters=64)
# A narrow ResNet-10 for CPU demos (~1/8 of ResNet-18's FLOPs).
ResNetSmall = functools.partial(ResNet, stage_sizes=(1, 1, 1, 1), num_filters=32)
ResNetTiny = functools.partial(ResNet, stage_sizes=(1, 1), num_filters=8)
