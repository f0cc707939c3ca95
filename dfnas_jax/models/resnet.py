"""ResNets in Flax with torchvision's module names.

Every variable path maps one-to-one onto a torchvision-style `state_dict` key
(`layer1.0.conv1.weight` <-> `params/layer1_0/conv1/kernel`), so converted PyTorch
checkpoints load without a renaming table. Paddings are explicit because flax's
'SAME' padding for stride-2 convolutions differs from PyTorch's symmetric padding.

Models take images in [0, 1] (NHWC) and normalize them themselves with the
`mean`/`std` they were trained with, so no caller has to know the statistics.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dfnas_jax.models.layers import batch_norm, conv_init, normalize

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv(features, kernel, strides, pad, name, dtype):
  return nn.Conv(features, (kernel, kernel), (strides, strides),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=conv_init, dtype=dtype, name=name)


class BasicBlock(nn.Module):
  features: int
  strides: int = 1
  downsample: bool = False
  norm: Any = nn.BatchNorm
  dtype: Any = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x):
    residual = x
    y = _conv(self.features, 3, self.strides, 1, 'conv1', self.dtype)(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = _conv(self.features, 3, 1, 1, 'conv2', self.dtype)(y)
    y = self.norm(name='bn2')(y)
    if self.downsample:
      residual = _conv(self.features, 1, self.strides, 0, 'downsample_0', self.dtype)(x)
      residual = self.norm(name='downsample_1')(residual)
    return nn.relu(y + residual)


class Bottleneck(nn.Module):
  """torchvision v1.5 bottleneck: the stride sits on the 3x3 convolution."""
  features: int
  strides: int = 1
  downsample: bool = False
  norm: Any = nn.BatchNorm
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x):
    residual = x
    y = _conv(self.features, 1, 1, 0, 'conv1', self.dtype)(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = _conv(self.features, 3, self.strides, 1, 'conv2', self.dtype)(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = _conv(self.features * 4, 1, 1, 0, 'conv3', self.dtype)(y)
    y = self.norm(name='bn3')(y)
    if self.downsample:
      residual = _conv(self.features * 4, 1, self.strides, 0, 'downsample_0', self.dtype)(x)
      residual = self.norm(name='downsample_1')(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """ResNet with a CIFAR stem (3x3 conv) or an ImageNet stem (7x7/2 conv + max-pool).

  Attributes:
    axis_name: pmap axis over which BatchNorm batch statistics are averaged in
      training mode (cross-replica BatchNorm); None for per-device statistics.
  """
  block: Any
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  num_classes: int
  stem: str = 'cifar'
  mean: Sequence[float] = CIFAR10_MEAN
  std: Sequence[float] = CIFAR10_STD
  dtype: Any = jnp.float32
  axis_name: Optional[str] = 'batch'
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, images, train: bool = False):
    norm = batch_norm(train, self.bn_momentum, self.axis_name, self.dtype)
    x = normalize(images, self.mean, self.std, self.dtype)
    if self.stem == 'cifar':
      x = _conv(self.widths[0], 3, 1, 1, 'conv1', self.dtype)(x)
      x = nn.relu(norm(name='bn1')(x))
    elif self.stem == 'imagenet':
      x = _conv(64, 7, 2, 3, 'conv1', self.dtype)(x)
      x = nn.relu(norm(name='bn1')(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"ResNet stem must be 'cifar' or 'imagenet', got {self.stem!r}")
    in_features = x.shape[-1]
    for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for i in range(num_blocks):
        strides = 2 if stage > 0 and i == 0 else 1
        out_features = width * self.block.expansion
        x = self.block(width, strides,
                       downsample=strides != 1 or in_features != out_features,
                       norm=norm, dtype=self.dtype, name=f'layer{stage + 1}_{i}')(x)
        in_features = out_features
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x).astype(jnp.float32)
