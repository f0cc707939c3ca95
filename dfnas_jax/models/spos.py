"""The ShuffleNetV2 one-shot search space of SPOS (Guo et al., 2020), in Flax.

An architecture is one choice per layer, an integer in [0, 4): ShuffleNetV2
blocks with a 3x3, 5x5 or 7x7 depthwise kernel, or an Xception block (three
depthwise 3x3). `SPOSNet(space)` is the supernet: it holds every choice of every
layer and takes the architecture as a *traced* integer array, running each layer
through `nn.switch`, so one compiled step serves every path. `SPOSNet(space,
choices=(...))` is the stand-alone network of one architecture, for retraining.

Names: `architecture_name('spos_cifar', (0, 3, ...))` is 'spos_cifar:03...', which
`dfnas_jax.models.build_model` accepts like any zoo name.
"""
import dataclasses
from functools import partial
from typing import Any, Iterator, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from dfnas_jax.models import layers
from dfnas_jax.models.resnet import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD

CHOICES = ('shufflenet_3x3', 'shufflenet_5x5', 'shufflenet_7x7', 'xception')
NUM_CHOICES = len(CHOICES)
KERNELS = (3, 5, 7)

@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Widths and depths of the supernet; the reference is `SPACES['spos_imagenet']`."""
  stage_repeats: Tuple[int, ...]
  stage_widths: Tuple[int, ...]
  stage_strides: Tuple[int, ...]
  stem_width: int
  stem_stride: int
  last_width: int
  image_size: int
  mean: Tuple[float, ...]
  std: Tuple[float, ...]

  @property
  def num_layers(self) -> int:
    return sum(self.stage_repeats)

  def layers(self) -> Iterator[Tuple[int, int, int, int]]:
    """(in_channels, out_channels, stride, input side) of each choice layer."""
    channels, side = self.stem_width, layers.out_side(self.image_size, self.stem_stride)
    for repeats, width, stride in zip(self.stage_repeats, self.stage_widths, self.stage_strides):
      for i in range(repeats):
        s = stride if i == 0 else 1
        yield channels, width, s, side
        channels, side = width, layers.out_side(side, s)

  def check(self, choices: Sequence[int]) -> Tuple[int, ...]:
    choices = tuple(int(c) for c in choices)
    if len(choices) != self.num_layers or not all(0 <= c < NUM_CHOICES for c in choices):
      raise ValueError(f'An architecture of this space is {self.num_layers} choices in '
                       f'[0, {NUM_CHOICES}), got {choices}')
    return choices


SPACES = {
    # The reference space: 20 layers, 224 px, ~290-360 MFLOPs band.
    'spos_imagenet': SearchSpace((4, 4, 8, 4), (64, 160, 320, 640), (2, 2, 2, 2), 16, 2, 1024,
                                 224, IMAGENET_MEAN, IMAGENET_STD),
    # 32 px inputs: stem at full resolution, 12 layers, sized for CPU runs.
    'spos_cifar': SearchSpace((2, 2, 4, 4), (32, 64, 128, 256), (1, 2, 2, 2), 16, 1, 512,
                              32, CIFAR10_MEAN, CIFAR10_STD),
    # Tests and smoke runs: 4 layers.
    'spos_tiny': SearchSpace((1, 1, 1, 1), (16, 32, 64, 128), (1, 2, 2, 2), 8, 1, 128,
                             32, CIFAR10_MEAN, CIFAR10_STD),
}


def architecture_name(space: str, choices: Sequence[int]) -> str:
  return layers.digits_name(space, SPACES[space].check(choices))


def parse_name(name: str) -> Tuple[str, Optional[Tuple[int, ...]]]:
  """'spos_cifar' -> ('spos_cifar', None); 'spos_cifar:0123...' -> (space, choices)."""
  return layers.parse_digits_name(name, SPACES, 'SPOS')


class ChoiceBlock(nn.Module):
  """A ShuffleNetV2 unit whose main branch is choice `choice` of CHOICES.

  Stride 1: channel shuffle splits the input; the even half passes through.
  Stride 2: the whole input also goes through a depthwise+pointwise projection
  whose depthwise kernel is the choice's (3x3 for Xception), as in the reference.
  The main branch fills the remaining output channels.
  """
  out_channels: int
  stride: int
  choice: int
  affine: bool
  bn_momentum: float = 0.9
  axis_name: Optional[str] = 'batch'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = layers.batch_norm(train, self.bn_momentum, self.axis_name, self.dtype,
                             affine=self.affine)
    count = iter(range(100))

    def conv(y, features, kernel=1, stride=1, depthwise=False, relu=True):
      i = next(count)
      if depthwise:
        y = layers.DepthwiseConv(kernel, stride, self.dtype, name=f'conv{i}')(y)
      else:
        y = layers.PointwiseConv(features, self.dtype, name=f'conv{i}')(y)
      y = norm(name=f'bn{i}')(y)
      return nn.relu(y) if relu else y

    channels = x.shape[-1]
    kernel = KERNELS[self.choice] if self.choice < len(KERNELS) else 3
    if self.stride == 1:
      proj, x = x[..., 0::2], x[..., 1::2]
    else:
      proj = conv(x, channels, kernel, self.stride, depthwise=True, relu=False)
      proj = conv(proj, channels)
    mid, main_out = self.out_channels // 2, self.out_channels - proj.shape[-1]
    if self.choice < len(KERNELS):
      y = conv(x, mid)
      y = conv(y, mid, kernel, self.stride, depthwise=True, relu=False)
      y = conv(y, main_out)
    else:
      y = conv(x, x.shape[-1], 3, self.stride, depthwise=True, relu=False)
      y = conv(y, mid)
      y = conv(y, mid, 3, depthwise=True, relu=False)
      y = conv(y, mid)
      y = conv(y, mid, 3, depthwise=True, relu=False)
      y = conv(y, main_out)
    return jnp.concatenate([proj, y], axis=-1)


class ChoiceLayer(nn.Module):
  """All NUM_CHOICES blocks of one layer; `nn.switch` runs the selected one.

  Named `layer{i}` with children `choices_{c}`: the convention `layers.keep_unused`
  relies on.
  """
  out_channels: int
  stride: int
  block: Any  # partial(ChoiceBlock) with the shared settings

  def setup(self):
    self.choices = [self.block(self.out_channels, self.stride, c) for c in range(NUM_CHOICES)]

  def __call__(self, x, choice, train: bool = False):
    branches = [lambda mdl, y, c=c: mdl.choices[c](y, train) for c in range(NUM_CHOICES)]
    return layers.run_choice(self, choice, branches, x)


class SPOSNet(layers.LayerwiseNet):
  """Supernet (`choices=None`, architecture passed to `__call__`) or one architecture.

  As in the reference, the supernet's BatchNorms have no affine parameters (their
  statistics are recalibrated per candidate during the search); stand-alone
  networks have affine BatchNorms.
  """
  dropout: float = 0.1

  @nn.compact
  def __call__(self, images, architecture=None, train: bool = False):
    supernet = self.choices is None
    norm = layers.batch_norm(train, self.bn_momentum, self.axis_name, self.dtype,
                             affine=not supernet)
    block = partial(ChoiceBlock, affine=not supernet, bn_momentum=self.bn_momentum,
                    axis_name=self.axis_name, dtype=self.dtype)
    if supernet and architecture is None:
      architecture = jnp.zeros((self.space.num_layers,), jnp.int32)
    x = layers.normalize(images, self.mean, self.std, self.dtype)
    s = self.space.stem_stride
    x = nn.Conv(self.space.stem_width, (3, 3), (s, s), padding=((1, 1), (1, 1)), use_bias=False,
                kernel_init=layers.conv_init, dtype=self.dtype, name='stem_conv')(x)
    x = nn.relu(norm(name='stem_bn')(x))
    for i, (_, out_channels, stride, _) in enumerate(self.space.layers()):
      if supernet:
        x = ChoiceLayer(out_channels, stride, block, name=f'layer{i}')(x, architecture[i], train)
      else:
        x = block(out_channels, stride, self.choices[i], name=f'layer{i}')(x, train)
    x = nn.Conv(self.space.last_width, (1, 1), use_bias=False, kernel_init=layers.conv_init,
                dtype=self.dtype, name='last_conv')(x)
    x = nn.relu(norm(name='last_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, name='fc')(x)
    return x.astype(jnp.float32)


# --- Analytic cost -------------------------------------------------------------------

def _block_cost(in_ch: int, out_ch: int, stride: int, side: int, choice: int,
                affine: bool) -> Tuple[int, int]:
  """(multiply-adds, parameters) of one ChoiceBlock."""
  side_out = layers.out_side(side, stride)
  macs = params = 0
  kernel = KERNELS[choice] if choice < len(KERNELS) else 3

  def conv(cin, cout, kernel, s, in_side, depthwise=False):
    nonlocal macs, params
    weights = (cin if depthwise else cin * cout) * kernel * kernel
    macs += weights * layers.out_side(in_side, s) ** 2
    params += weights + (2 * cout if affine else 0)
    return layers.out_side(in_side, s)

  if stride == 1:
    proj_ch, main_in = in_ch - in_ch // 2, in_ch // 2  # x[..., 0::2], x[..., 1::2]
  else:
    proj_ch, main_in = in_ch, in_ch
    conv(in_ch, in_ch, kernel, stride, side, depthwise=True)
    conv(in_ch, in_ch, 1, 1, side_out)
  mid, main_out = out_ch // 2, out_ch - proj_ch
  if choice < len(KERNELS):
    conv(main_in, mid, 1, 1, side)
    conv(mid, mid, kernel, stride, side, depthwise=True)
    conv(mid, main_out, 1, 1, side_out)
  else:
    conv(main_in, main_in, 3, stride, side, depthwise=True)
    conv(main_in, mid, 1, 1, side_out)
    conv(mid, mid, 3, 1, side_out, depthwise=True)
    conv(mid, mid, 1, 1, side_out)
    conv(mid, mid, 3, 1, side_out, depthwise=True)
    conv(mid, main_out, 1, 1, side_out)
  return macs, params


def cost(space: SearchSpace, choices: Sequence[int], num_classes: int,
         affine: bool = True) -> Tuple[int, int]:
  """(FLOPs, parameters) of one architecture; FLOPs count multiply-adds of the
  convolutions and the classifier, as the SPOS/ShuffleNet papers do."""
  choices = space.check(choices)
  stem_side = layers.out_side(space.image_size, space.stem_stride)
  macs = 3 * space.stem_width * 9 * stem_side ** 2
  params = 3 * space.stem_width * 9 + (2 * space.stem_width if affine else 0)
  side = stem_side
  for (in_ch, out_ch, stride, side), choice in zip(space.layers(), choices):
    m, p = _block_cost(in_ch, out_ch, stride, side, choice, affine)
    macs, params = macs + m, params + p
  last_side, last_in = layers.out_side(side, stride), space.stage_widths[-1]
  macs += last_in * space.last_width * last_side ** 2 + space.last_width * num_classes
  params += (last_in * space.last_width + (2 * space.last_width if affine else 0)
             + space.last_width * num_classes)
  return macs, params

