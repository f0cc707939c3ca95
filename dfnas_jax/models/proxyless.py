"""The ProxylessNAS search space (Cai et al., 2019), in Flax.

A MobileNetV2-style network: a stem, one fixed MBConv block (expansion 1), then
searched layers in stages, a 1x1 feature-mixing convolution and the classifier.
Every searched layer is one of CANDIDATES: an MBConv block with a 3x3, 5x5 or
7x7 depthwise kernel and expansion 3 or 6, or, where the layer keeps its shape
(stride 1, same width), 'zero', which skips the layer (the residual remains).

- `ProxylessNet(space)` is the supernet. Its layers run
  - one path, `architecture=[L] int` (weight steps; `nn.switch`, one compile), or
  - binary gates, `gates=[L, K]` over the candidates `paths=[L, K]` (the
    reference's two-path mode, K = 2) or over all of them (`paths=None`). The
    output sum_k g_k op_k(x) with one-hot gates is the active path's output, and
    its gradient with respect to the gates is what `nas.proxyless` turns into
    architecture gradients.
- `ProxylessNet(space, choices=(...))` is one stand-alone architecture.

Names: `architecture_name('proxyless_cifar', (0, 6, ...))` is
'proxyless_cifar:06...', one digit per layer, which `dfnas_jax.models.build_model`
accepts like any zoo name.
"""
import dataclasses
import itertools
from functools import partial
from typing import Any, Iterator, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from dfnas_jax.models import layers
from dfnas_jax.models.resnet import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD

KERNELS = (3, 5, 7)
EXPANSIONS = (3, 6)
MBCONVS = tuple(itertools.product(KERNELS, EXPANSIONS))  # (kernel, expansion) of choice c
CANDIDATES = tuple(f'{k}x{k}_MBConv{e}' for k, e in MBCONVS) + ('zero',)
ZERO = len(CANDIDATES) - 1
NUM_CANDIDATES = len(CANDIDATES)


class Layer(NamedTuple):
  in_channels: int
  out_channels: int
  stride: int
  side: int  # input side

  @property
  def residual(self) -> bool:
    """Shape-keeping layers add their input, and may be 'zero' (skipped)."""
    return self.stride == 1 and self.in_channels == self.out_channels


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Widths and depths; the reference's is `SPACES['proxyless_imagenet']`."""
  stem_width: int
  stem_stride: int
  first_width: int  # the fixed MBConv (expansion 1, 3x3) after the stem
  stage_widths: Tuple[int, ...]
  stage_cells: Tuple[int, ...]
  stage_strides: Tuple[int, ...]
  last_width: int  # the 1x1 feature-mixing convolution
  image_size: int
  mean: Tuple[float, ...]
  std: Tuple[float, ...]

  @property
  def num_layers(self) -> int:
    return sum(self.stage_cells)

  def layers(self) -> Iterator[Layer]:
    channels, side = self.first_width, layers.out_side(self.image_size, self.stem_stride)
    for cells, width, stride in zip(self.stage_cells, self.stage_widths, self.stage_strides):
      for i in range(cells):
        s = stride if i == 0 else 1
        yield Layer(channels, width, s, side)
        channels, side = width, layers.out_side(side, s)

  def allowed(self) -> np.ndarray:
    """[num_layers, NUM_CANDIDATES] bool: which candidates each layer may choose."""
    mask = np.ones((self.num_layers, NUM_CANDIDATES), bool)
    mask[:, ZERO] = [layer.residual for layer in self.layers()]
    return mask

  def check(self, choices: Sequence[int]) -> Tuple[int, ...]:
    choices = tuple(int(c) for c in choices)
    allowed = self.allowed()
    if len(choices) != self.num_layers or not all(
        0 <= c < NUM_CANDIDATES and allowed[i, c] for i, c in enumerate(choices)):
      raise ValueError(
          f'An architecture of this space is {self.num_layers} choices in '
          f'[0, {NUM_CANDIDATES}) ({", ".join(f"{i}={n}" for i, n in enumerate(CANDIDATES))}), '
          f'{ZERO} only in the shape-keeping layers {np.flatnonzero(allowed[:, ZERO]).tolist()}; '
          f'got {choices}')
    return choices


SPACES = {
    # The reference (ImageNet, 224 px, GPU search): 21 searched layers.
    'proxyless_imagenet': SearchSpace(32, 2, 16, (24, 40, 80, 96, 192, 320), (4, 4, 4, 4, 4, 1),
                                      (2, 2, 2, 1, 2, 1), 1280, 224, IMAGENET_MEAN, IMAGENET_STD),
    # 32 px inputs, sized for CPU runs: 11 searched layers down to 4x4.
    'proxyless_cifar': SearchSpace(16, 1, 8, (16, 24, 32, 48, 64, 96), (2, 2, 2, 2, 2, 1),
                                   (1, 2, 2, 1, 2, 1), 256, 32, CIFAR10_MEAN, CIFAR10_STD),
    # Tests and smoke runs: 3 searched layers.
    'proxyless_tiny': SearchSpace(8, 1, 8, (8, 16), (2, 1), (1, 2), 64, 32,
                                  CIFAR10_MEAN, CIFAR10_STD),
}


def architecture_name(space: str, choices: Sequence[int]) -> str:
  return layers.digits_name(space, SPACES[space].check(choices))


def parse_name(name: str) -> Tuple[str, Optional[Tuple[int, ...]]]:
  """'proxyless_cifar' -> (space, None); 'proxyless_cifar:0361...' -> (space, choices)."""
  return layers.parse_digits_name(name, SPACES, 'ProxylessNAS')


@dataclasses.dataclass(frozen=True)
class BlockSettings:
  """What every block of a ProxylessNet shares: its BatchNorm and activation dtype."""
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: Optional[str] = 'batch'
  dtype: Any = jnp.float32

  def norm(self, train: bool, name: str) -> nn.Module:
    return layers.batch_norm(train, self.bn_momentum, self.axis_name, self.dtype,
                             epsilon=self.bn_epsilon)(name=name)


class MBConv(nn.Module):
  """Inverted residual body: 1x1 expansion, kxk depthwise (stride), 1x1 projection.

  ReLU6 after the first two, BatchNorm after each; the residual is the caller's.
  """
  out_channels: int
  kernel: int
  expansion: int
  stride: int
  settings: BlockSettings = BlockSettings()

  @nn.compact
  def __call__(self, x, train: bool = False):
    s = self.settings
    conv1x1 = partial(layers.PointwiseConv, dtype=s.dtype)
    y = x
    if self.expansion != 1:
      y = nn.relu6(s.norm(train, 'expand_bn')(conv1x1(x.shape[-1] * self.expansion,
                                                      name='expand')(y)))
    y = layers.DepthwiseConv(self.kernel, self.stride, s.dtype, name='depthwise')(y)
    y = nn.relu6(s.norm(train, 'depthwise_bn')(y))
    return s.norm(train, 'project_bn')(conv1x1(self.out_channels, name='project')(y))


class MixedLayer(nn.Module):
  """Every MBConv candidate of one searched layer (zero has no parameters)."""
  layer: Layer
  block: Any  # partial(MBConv) with the shared settings

  def setup(self):
    # Rematerialized: the gradient of `nn.switch` otherwise keeps zero-filled
    # activations of every candidate (weight step at 32 px, batch 32 on CPU: 2.3 s -> 1.8 s).
    remat = nn.remat(self.block.func, static_argnums=(2,))
    block = partial(remat, *self.block.args, **self.block.keywords)
    self.choices = [block(self.layer.out_channels, k, e, self.layer.stride) for k, e in MBCONVS]

  def _candidate(self, c: int, x, train: bool):
    if c == ZERO:
      side = layers.out_side(x.shape[1], self.layer.stride)
      return jnp.zeros((x.shape[0], side, side, self.layer.out_channels), x.dtype)
    return self.choices[c](x, train)

  def __call__(self, x, choice=None, gates=None, paths=None, train: bool = False):
    if gates is None:  # one path
      branches = [lambda mdl, y, c=c: mdl._candidate(c, y, train) for c in range(NUM_CANDIDATES)]
      y = layers.run_choice(self, choice, branches, x)
    elif paths is None:  # gates over every candidate
      y = sum(g * self._candidate(c, x, train) for c, g in enumerate(gates))
    else:  # gates over the sampled candidates `paths`
      branches = [lambda mdl, y, c=c: mdl._candidate(c, y, train) for c in range(NUM_CANDIDATES)]
      y = sum(g * layers.run_choice(self, p, branches, x) for g, p in zip(gates, paths))
    return x + y if self.layer.residual else y


class Stem(nn.Module):
  """Normalization, 3x3 convolution, and the fixed first MBConv (expansion 1)."""
  space: SearchSpace
  settings: BlockSettings = BlockSettings()

  @nn.compact
  def __call__(self, images, train: bool = False):
    dtype, stride = self.settings.dtype, self.space.stem_stride
    x = layers.normalize(images, self.space.mean, self.space.std, dtype)
    x = nn.Conv(self.space.stem_width, (3, 3), (stride, stride), padding=((1, 1), (1, 1)),
                use_bias=False, kernel_init=layers.conv_init, dtype=dtype, name='conv')(x)
    x = nn.relu6(self.settings.norm(train, 'bn')(x))
    return MBConv(self.space.first_width, 3, 1, 1, self.settings, name='first_block')(x, train)


class Head(nn.Module):
  """1x1 feature-mixing convolution, global average pooling, dropout, classifier."""
  last_width: int
  num_classes: int
  dropout: float = 0.0
  settings: BlockSettings = BlockSettings()

  @nn.compact
  def __call__(self, x, train: bool = False):
    dtype = self.settings.dtype
    x = nn.Conv(self.last_width, (1, 1), use_bias=False, kernel_init=layers.conv_init,
                dtype=dtype, name='feature_mix')(x)
    x = nn.relu6(self.settings.norm(train, 'feature_mix_bn')(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(jnp.mean(x, axis=(1, 2)))
    return nn.Dense(self.num_classes, dtype=dtype, name='classifier')(x).astype(jnp.float32)


class ProxylessNet(layers.LayerwiseNet):
  """Supernet (`choices=None`) or one stand-alone architecture of `space`."""
  bn_epsilon: float = 1e-5  # the reference's is 1e-3

  @nn.compact
  def __call__(self, images, architecture=None, gates=None, paths=None, train: bool = False):
    """Supernet: one of `architecture` [L] int, or `gates` [L, K] (with `paths` [L, K])."""
    settings = BlockSettings(self.bn_momentum, self.bn_epsilon, self.axis_name, self.dtype)
    block = partial(MBConv, settings=settings)
    supernet = self.choices is None
    if supernet and architecture is None and gates is None:
      architecture = jnp.zeros((self.space.num_layers,), jnp.int32)
    x = Stem(self.space, settings, name='stem')(images, train)
    for i, layer in enumerate(self.space.layers()):
      if supernet:
        mixed = MixedLayer(layer, block, name=f'layer{i}')
        if gates is None:
          x = mixed(x, choice=architecture[i], train=train)
        else:
          x = mixed(x, gates=gates[i], paths=None if paths is None else paths[i], train=train)
      elif self.choices[i] != ZERO:
        k, e = MBCONVS[self.choices[i]]
        y = block(layer.out_channels, k, e, layer.stride, name=f'layer{i}')(x, train)
        x = x + y if layer.residual else y
    return Head(self.space.last_width, self.num_classes, self.dropout, settings,
                name='head')(x, train)


# --- Analytic cost -------------------------------------------------------------------

def mbconv_cost(in_channels: int, out_channels: int, kernel: int, expansion: int, stride: int,
                side: int) -> Tuple[int, int]:
  """(multiply-adds, parameters) of one MBConv block (BatchNorm affine included)."""
  mid, side_out = in_channels * expansion, layers.out_side(side, stride)
  macs = params = 0
  if expansion != 1:
    macs += in_channels * mid * side ** 2
    params += in_channels * mid + 2 * mid
  macs += mid * kernel ** 2 * side_out ** 2
  params += mid * kernel ** 2 + 2 * mid
  macs += mid * out_channels * side_out ** 2
  params += mid * out_channels + 2 * out_channels
  return macs, params


def candidate_costs(space: SearchSpace) -> np.ndarray:
  """[num_layers, NUM_CANDIDATES, 2]: (multiply-adds, parameters) of every candidate."""
  costs = np.zeros((space.num_layers, NUM_CANDIDATES, 2), np.int64)
  for i, layer in enumerate(space.layers()):
    for c, (k, e) in enumerate(MBCONVS):
      costs[i, c] = mbconv_cost(layer.in_channels, layer.out_channels, k, e, layer.stride,
                                layer.side)
  return costs


def fixed_cost(space: SearchSpace, num_classes: int) -> Tuple[int, int]:
  """(multiply-adds, parameters) of the layers every architecture has."""
  side = layers.out_side(space.image_size, space.stem_stride)
  macs = 3 * space.stem_width * 9 * side ** 2
  params = 3 * space.stem_width * 9 + 2 * space.stem_width
  m, p = mbconv_cost(space.stem_width, space.first_width, 3, 1, 1, side)
  last = list(space.layers())[-1]
  last_side = layers.out_side(last.side, last.stride)
  m2 = last.out_channels * space.last_width * last_side ** 2 + space.last_width * num_classes
  p2 = (last.out_channels * space.last_width + 2 * space.last_width
        + space.last_width * num_classes + num_classes)
  return macs + m + m2, params + p + p2


def cost(space: SearchSpace, choices: Sequence[int], num_classes: int) -> Tuple[int, int]:
  """(FLOPs as multiply-adds, parameters) of one architecture."""
  choices = space.check(choices)
  table = candidate_costs(space)
  macs, params = fixed_cost(space, num_classes)
  for i, c in enumerate(choices):
    macs, params = macs + int(table[i, c, 0]), params + int(table[i, c, 1])
  return macs, params
