"""A plain-torch ResNet with torchvision's module names, the reference for the converter.

torchvision is not a dependency; this is its `resnet.py` architecture (BasicBlock,
Bottleneck with the stride on the 3x3 conv, 1x1 conv + BN `downsample`, 7x7/2 stem
and 3x3/2 max-pool, average pool, `fc`), so `state_dict()` has torchvision's keys
(`conv1.weight`, `layer2.0.downsample.1.running_var`, `fc.bias`, ...).
"""
import torch
from torch import nn


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = _downsample(inplanes, planes, stride)

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    out = planes * 4
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    self.downsample = _downsample(inplanes, out, stride)

  def forward(self, x):
    y = torch.relu(self.bn1(self.conv1(x)))
    y = torch.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return torch.relu(y + (self.downsample(x) if self.downsample is not None else x))


def _downsample(inplanes, out, stride):
  if stride == 1 and inplanes == out:
    return None
  return nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))


class ResNet(nn.Module):
  """torchvision's ResNet(block, layers, num_classes) with `widths` per stage (64..512)."""

  def __init__(self, block, layers, widths=(64, 128, 256, 512), num_classes=10):
    super().__init__()
    self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = widths[0]
    for i, (planes, depth) in enumerate(zip(widths, layers)):
      blocks = []
      for b in range(depth):
        blocks.append(block(inplanes, planes, 2 if (i > 0 and b == 0) else 1))
        inplanes = planes * block.expansion
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.num_stages = len(layers)
    self.fc = nn.Linear(inplanes, num_classes)

  def features(self, x):
    """NCHW images -> the last feature map (NCHW)."""
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    for i in range(self.num_stages):
      x = getattr(self, f"layer{i + 1}")(x)
    return x

  def forward(self, x):
    return self.fc(self.features(x).mean(dim=(2, 3)))


def randomised(model, seed, image_size=64):
  """Random weights and BatchNorm affine, running statistics measured on random images
  (so they are non-trivial yet keep activations O(1) through the depth), eval mode."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
      elif isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
        m.momentum = 1.0  # running stats := this batch's statistics
    model.train()(torch.randn((8, 3, image_size, image_size), generator=gen) * 2 + 0.3)
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.momentum = 0.1
  return model.eval()


def resnet18(seed=0, num_classes=10):
  return randomised(ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes), seed)
