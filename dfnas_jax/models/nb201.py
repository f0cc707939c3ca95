"""The NAS-Bench-201 cell search space (Dong & Yang, ICLR 2020), in Flax.

A cell has 4 nodes; node j sums one operation on each earlier node i < j, so
6 edges, each one of the 5 OPS. An architecture is one op index per edge, in the
order of the benchmark's string `|op~0|+|op~0|op~1|+|op~0|op~1|op~2|` (node 1's
input edge, node 2's two, node 3's three): `EDGES[e] = (node, input)`.

- `NB201Net(num_classes)`: the one-shot supernet, taking the cell architecture as a
  traced int array (one compiled step for every path); `NB201Net(num_classes,
  ops=(...))`: the stand-alone network of one cell, as the benchmark trains it.
- `NB201SearchNet`: the DARTS search network (softmax(alpha)-weighted edges);
  `initial_alphas`, `derive_architecture`.
- `cost(ops, num_classes)`: analytic (multiply-adds, parameters).

Names: `architecture_name(ops)` is 'nb201:<cell string>' for the benchmark's C=16,
N=5 network and 'nb201-<C>x<N>:<cell string>' otherwise; without a cell string the
supernet. `dfnas_jax.models.build_model` accepts them like any zoo name.
"""
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dfnas_jax.models.layers import batch_norm, conv_init, normalize, run_choice
from dfnas_jax.models.resnet import CIFAR10_MEAN, CIFAR10_STD

OPS = ('none', 'skip_connect', 'nor_conv_1x1', 'nor_conv_3x3', 'avg_pool_3x3')
EDGES = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))
NUM_EDGES = len(EDGES)
NUM_ARCHITECTURES = len(OPS) ** NUM_EDGES  # 15,625

Arch = Tuple[int, ...]


def check(ops: Sequence[int]) -> Arch:
  ops = tuple(int(o) for o in ops)
  if len(ops) != NUM_EDGES or not all(0 <= o < len(OPS) for o in ops):
    raise ValueError(f'A NAS-Bench-201 cell is {NUM_EDGES} op indices in [0, {len(OPS)}), '
                     f'got {ops}.')
  return ops


def arch_to_string(ops: Sequence[int]) -> str:
  """(3, 3, 3, 1, 3, 2) -> '|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|...|'."""
  ops = check(ops)
  nodes = []
  for node in range(1, 4):
    nodes.append('|' + '|'.join(f'{OPS[ops[e]]}~{i}' for e, (j, i) in enumerate(EDGES)
                                if j == node) + '|')
  return '+'.join(nodes)


def arch_from_string(text: str) -> Arch:
  """`arch_to_string`'s inverse; anything else is one clear error."""
  expected = ("the benchmark's '|op~0|+|op~0|op~1|+|op~0|op~1|op~2|' with ops from "
              f'{list(OPS)}')
  nodes = text.split('+')
  if len(nodes) != 3:
    raise ValueError(f'{text!r} is not a NAS-Bench-201 cell: expected {expected}.')
  ops = []
  for node, part in enumerate(nodes, start=1):
    edges = part.strip('|').split('|') if part.startswith('|') and part.endswith('|') else []
    if len(edges) != node:
      raise ValueError(f'{text!r} is not a NAS-Bench-201 cell: node {node} needs {node} '
                       f'edges; expected {expected}.')
    for i, edge in enumerate(edges):
      op, _, source = edge.partition('~')
      if op not in OPS or source != str(i):
        raise ValueError(f'{text!r} is not a NAS-Bench-201 cell: edge {edge!r} of node {node} '
                         f'should be <op>~{i}; expected {expected}.')
      ops.append(OPS.index(op))
  return tuple(ops)


# --- Networks ------------------------------------------------------------------------
#
# The benchmark's macro skeleton (`TinyNetwork`): a 3x3 stem convolution with BN, three
# stages of `cells_per_stage` cells with C, 2C and 4C channels separated by residual
# reduction blocks, then BN, ReLU, global average pooling and a linear classifier. Every
# cell of a network has the same cell architecture.
#
# Variables: `stem_conv`, `stem_bn`, `cell{k}` (k = 0 .. 3N-1 over the three stages),
# `reduce1`/`reduce2` (`conv_a`, `conv_b`: each `conv` + `bn`; `shortcut`), `last_bn`,
# `classifier`. A cell's edge e is `cell{k}/layer{e}`: in the one-shot supernet and the
# DARTS search network it holds every op as `choices_{c}` (only the convolutions have
# variables, `conv` and `bn`), the convention `layers.keep_unused` relies on; in a
# stand-alone network it is the chosen op itself (absent for parameter-free ops).

BENCHMARK_CHANNELS, BENCHMARK_CELLS = 16, 5  # the benchmark's C and N
KERNELS = {'nor_conv_1x1': 1, 'nor_conv_3x3': 3}


_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def _conv(x, kernel, pad_low: int, pad_high: int):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad_low, pad_high),) * 2,
                                      dimension_numbers=_DIMENSIONS)


@jax.custom_vjp
def conv_same(x, kernel):
  """Stride-1 convolution with PyTorch's padding (k - 1) // 2 (odd k), HWIO kernel.

  Its gradients are written as convolutions in the canonical NHWC/HWIO form: inside a
  `lax.switch` branch (the supernet's edges) XLA:CPU keeps the ones autodiff derives
  in other layouts and runs them tens of times slower (docs/benchmarks.md).
  """
  pad = (kernel.shape[0] - 1) // 2
  return _conv(x, kernel, pad, pad)


def _conv_same_forward(x, kernel):
  return conv_same(x, kernel), (x, kernel)


def _conv_same_backward(residuals, grad):
  x, kernel = residuals
  k = kernel.shape[0]
  pad = (k - 1) // 2
  # The barriers keep XLA from folding the transposes back into the convolutions' layouts.
  flipped = jax.lax.optimization_barrier(jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))
  grad_x = _conv(grad, flipped, k - 1 - pad, pad)
  # Weight gradient: the batch is the contracted axis, the feature map the window.
  x_t, grad_t = jax.lax.optimization_barrier((x.transpose(3, 1, 2, 0), grad.transpose(1, 2, 0, 3)))
  grad_kernel = _conv(x_t, grad_t, pad, k - 1 - pad)  # [in, k, k, out]
  return grad_x, grad_kernel.transpose(1, 2, 0, 3)


conv_same.defvjp(_conv_same_forward, _conv_same_backward)


class SameConv(nn.Module):
  """`nn.Conv(features, (k, k), use_bias=False)`'s `kernel` at stride 1, PyTorch padding;
  through `conv_same` on CPU (see there)."""
  features: int
  kernel_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', conv_init, (k, k, x.shape[-1], self.features))
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if jax.default_backend() == 'cpu':
      return conv_same(x, kernel)
    return _conv(x, kernel, (k - 1) // 2, (k - 1) // 2)


class _Block(nn.Module):
  """Shared settings; BatchNorms have PyTorch's defaults (momentum 0.1 = flax 0.9, eps 1e-5)."""
  affine: bool = True
  bn_momentum: float = 0.9
  axis_name: Optional[str] = 'batch'
  dtype: Any = jnp.float32

  def relu_conv_bn(self, x, features: int, kernel: int, stride: int, train: bool):
    """The benchmark's ReLUConvBN as submodules `conv` and `bn`.

    PyTorch's symmetric padding (k - 1) // 2 and no convolution bias. (The benchmark
    gives the convolutions of its affine-free search cells a bias, which the BN right
    after cancels.)
    """
    if stride == 1:
      x = SameConv(features, kernel, self.dtype, name='conv')(nn.relu(x))
    else:
      pad = (kernel - 1) // 2
      x = nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                  use_bias=False, kernel_init=conv_init, dtype=self.dtype, name='conv')(nn.relu(x))
    return batch_norm(train, self.bn_momentum, self.axis_name, self.dtype,
                      affine=self.affine)(name='bn')(x)

  def settings(self):
    return dict(affine=self.affine, bn_momentum=self.bn_momentum, axis_name=self.axis_name,
                dtype=self.dtype)


class ReLUConvBN(_Block):
  """`_Block.relu_conv_bn` as a module of its own (the reduction block has two)."""
  features: int = 16
  kernel_size: int = 3
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    return self.relu_conv_bn(x, self.features, self.kernel_size, self.stride, train)


class Operation(_Block):
  """OPS[op] on a C-channel map, keeping its shape."""
  op: int = 0

  @nn.compact
  def __call__(self, x, train: bool = False):
    name = OPS[self.op]
    if name == 'none':
      return jnp.zeros_like(x)
    if name == 'skip_connect':
      return x
    if name == 'avg_pool_3x3':  # border windows average only the pixels inside the map
      y = nn.avg_pool(x, (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False)
      return y.astype(x.dtype)  # the float32 pixel counts would promote bfloat16
    return self.relu_conv_bn(x, x.shape[-1], KERNELS[name], 1, train)


class _Edge(_Block):
  """Every op of one edge as `choices_{c}`."""

  def setup(self):
    self.choices = [Operation(**self.settings(), op=c) for c in range(len(OPS))]


class ChoiceEdge(_Edge):
  """The one-shot supernet's edge: `nn.switch` runs op `choice` (a traced integer)."""

  def __call__(self, x, choice, train: bool = False):
    branches = [lambda mdl, y, c=c: mdl.choices[c](y, train) for c in range(len(OPS))]
    return run_choice(self, choice, branches, x)


class MixedEdge(_Edge):
  """The DARTS search network's edge: sum_c weights[c] * OPS[c](x)."""

  def __call__(self, x, weights, train: bool = False):
    total = 0.
    for c, name in enumerate(OPS):
      if name == 'none':  # contributes weight * 0
        continue
      y = self.choices[c](x, train)
      total = total + weights[c].astype(y.dtype) * y
    return total


class Cell(_Block):
  """Node j = sum over i < j of edge (j, i) applied to node i; the output is node 3.

  With `ops`, a stand-alone cell. Without, `arch` is the supernet's path (NUM_EDGES
  op indices, traced) or, with `mixed`, the DARTS search cell's [NUM_EDGES, len(OPS)]
  op weights.
  """
  ops: Optional[Arch] = None
  mixed: bool = False

  @nn.compact
  def __call__(self, x, arch=None, train: bool = False):
    nodes = [x]
    for node in range(1, 4):
      terms = []
      for e, (j, i) in enumerate(EDGES):
        if j != node:
          continue
        if self.ops is not None:
          if OPS[self.ops[e]] == 'none':  # adds zeros: nothing to compute
            continue
          y = Operation(**self.settings(), op=self.ops[e], name=f'layer{e}')(nodes[i], train)
        else:
          edge = MixedEdge if self.mixed else ChoiceEdge
          y = edge(**self.settings(), name=f'layer{e}')(nodes[i], arch[e], train)
        terms.append(y)
      nodes.append(sum(terms) if terms else jnp.zeros_like(x))
    return nodes[3]


class ResidualReduction(_Block):
  """The benchmark's ResNetBasicblock with stride 2, between stages.

  conv_b(conv_a(x)) (ReLUConvBN, the first with stride 2) plus a shortcut: 2x2 average
  pooling with stride 2, then a 1x1 convolution (no BN).
  """
  features: int = 32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.shape[1] % 2 or x.shape[2] % 2:  # the two branches would disagree in size
      raise ValueError(f'A NAS-Bench-201 reduction needs an even feature map, got {x.shape}; '
                       'use image sides divisible by 4.')
    y = ReLUConvBN(**self.settings(), features=self.features, kernel_size=3, stride=2,
                   name='conv_a')(x, train)
    y = ReLUConvBN(**self.settings(), features=self.features, kernel_size=3,
                   name='conv_b')(y, train)
    shortcut = nn.avg_pool(x, (2, 2), (2, 2), padding='VALID')
    shortcut = nn.Conv(self.features, (1, 1), use_bias=False, kernel_init=conv_init,
                       dtype=self.dtype, name='shortcut')(shortcut)
    return shortcut + y


class _Network(nn.Module):
  """The skeleton around `cell(name, x)`.

  The BNs outside the cells are affine in every network: the benchmark's search
  networks keep them affine too.
  """
  num_classes: int
  channels: int = BENCHMARK_CHANNELS
  cells_per_stage: int = BENCHMARK_CELLS
  bn_momentum: float = 0.9
  dropout: float = 0.0  # before the classifier; the benchmark has none
  axis_name: Optional[str] = 'batch'
  dtype: Any = jnp.float32

  @property
  def mean(self):
    return CIFAR10_MEAN

  @property
  def std(self):
    return CIFAR10_STD

  def skeleton(self, images, cell, train: bool):
    settings = dict(affine=True, bn_momentum=self.bn_momentum, axis_name=self.axis_name,
                    dtype=self.dtype)
    norm = lambda name: batch_norm(train, self.bn_momentum, self.axis_name, self.dtype)(name=name)
    x = normalize(images, self.mean, self.std, self.dtype)
    x = nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                kernel_init=conv_init, dtype=self.dtype, name='stem_conv')(x)
    x = norm('stem_bn')(x)  # no ReLU, as in the benchmark: its conv ops start with one
    for stage in range(3):
      if stage:
        x = ResidualReduction(**settings, features=self.channels * 2 ** stage,
                              name=f'reduce{stage}')(x, train)
      for i in range(self.cells_per_stage):
        x = cell(f'cell{stage * self.cells_per_stage + i}', x)
    x = nn.relu(norm('last_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x).astype(jnp.float32)


class NB201Net(_Network):
  """The one-shot supernet (`ops=None`, path passed to `__call__`) or one architecture.

  The supernet holds every op on every edge of every cell and takes the cell
  architecture as a *traced* int array of NUM_EDGES op indices (the same in every
  cell), running each edge through `nn.switch`, so one compiled step serves every
  path. Its cells' BNs have no affine parameters (their statistics are recalibrated
  per path); a stand-alone network (`ops=(...)`) has affine BNs and only the chosen
  ops.
  """
  ops: Optional[Arch] = None

  @nn.compact
  def __call__(self, images, architecture=None, train: bool = False):
    ops = None if self.ops is None else check(self.ops)
    if ops is None and architecture is None:
      architecture = jnp.zeros((NUM_EDGES,), jnp.int32)
    cell = lambda name, x: Cell(affine=ops is not None, bn_momentum=self.bn_momentum,
                                axis_name=self.axis_name, dtype=self.dtype, ops=ops,
                                name=name)(x, architecture, train)
    return self.skeleton(images, cell, train)


class NB201SearchNet(_Network):
  """The DARTS search network on this space; `alphas` = {'cell': [NUM_EDGES, len(OPS)]} logits.

  The logits are an *input*, not a variable, as in `darts.DARTSSearchNet`. The
  variables are laid out as the supernet's (`cell{k}/layer{e}/choices_{c}`), so the
  two can share weights. The cells' BNs have no affine parameters.
  """

  @nn.compact
  def __call__(self, images, alphas=None, train: bool = False):
    if alphas is None:
      alphas = initial_alphas(None)
    weights = jax.nn.softmax(jnp.asarray(alphas['cell'], jnp.float32), axis=-1)
    cell = lambda name, x: Cell(affine=False, bn_momentum=self.bn_momentum,
                                axis_name=self.axis_name, dtype=self.dtype, mixed=True,
                                name=name)(x, weights, train)
    return self.skeleton(images, cell, train)


def initial_alphas(rng: Optional[jax.Array], scale: float = 1e-3) -> Dict[str, jax.Array]:
  """{'cell': scale * N(0, 1) logits [NUM_EDGES, len(OPS)]} (zeros if no rng)."""
  shape = (NUM_EDGES, len(OPS))
  if rng is None:
    return {'cell': jnp.zeros(shape)}
  return {'cell': scale * jax.random.normal(rng, shape)}


def derive_architecture(alphas) -> Arch:
  """The strongest op of every edge, `none` included (as the benchmark's DARTS baselines)."""
  logits = np.asarray(alphas['cell'], np.float32)
  if logits.shape != (NUM_EDGES, len(OPS)):
    raise ValueError(f"alphas['cell'] must be [{NUM_EDGES}, {len(OPS)}], got {logits.shape}")
  return check(logits.argmax(axis=-1))


# --- Names ---------------------------------------------------------------------------

_NAME = re.compile(r'nb201(?:-(\d+)x(\d+))?(?::(.*))?', re.DOTALL)


def is_name(name: str) -> bool:
  """Whether `name` is meant as a NAS-Bench-201 network (it may still be malformed)."""
  return name == 'nb201' or name.startswith(('nb201-', 'nb201:'))


def architecture_name(ops: Optional[Sequence[int]], channels: int = BENCHMARK_CHANNELS,
                      cells_per_stage: int = BENCHMARK_CELLS) -> str:
  """'nb201:<cell string>' for the benchmark's C=16, N=5 network, else
  'nb201-<C>x<N>:<cell string>'; without `ops`, the supernet's 'nb201[-<C>x<N>]'."""
  size = ('' if (channels, cells_per_stage) == (BENCHMARK_CHANNELS, BENCHMARK_CELLS)
          else f'-{int(channels)}x{int(cells_per_stage)}')
  return f'nb201{size}' + ('' if ops is None else ':' + arch_to_string(ops))


def parse_name(name: str) -> Tuple[int, int, Optional[Arch]]:
  """`architecture_name`'s inverse: (channels, cells_per_stage, ops or None)."""
  match = _NAME.fullmatch(name)
  expected = ("expected 'nb201' or 'nb201-<channels>x<cells per stage>' (the supernet), "
              "optionally followed by ':' and a cell string '|op~0|+|op~0|op~1|+|op~0|op~1|op~2|'")
  if not match or (match.group(1) is not None and
                   (int(match.group(1)) < 1 or int(match.group(2)) < 1)):
    raise ValueError(f'{name!r} is not a NAS-Bench-201 architecture: {expected}.')
  channels, cells, text = match.groups()
  ops = None
  if text is not None:
    try:
      ops = arch_from_string(text)
    except ValueError as error:
      raise ValueError(f'{name!r} is not a NAS-Bench-201 architecture: {error}') from None
    if arch_to_string(ops) != text:  # e.g. extra '|': one name per architecture
      raise ValueError(f'{name!r} is not a NAS-Bench-201 architecture: its cell should be '
                       f'written {arch_to_string(ops)!r}.')
  return (int(channels or BENCHMARK_CHANNELS), int(cells or BENCHMARK_CELLS), ops)


# --- Analytic cost -------------------------------------------------------------------

def cost(ops: Sequence[int], num_classes: int, channels: int = BENCHMARK_CHANNELS,
         cells_per_stage: int = BENCHMARK_CELLS, image_size: int = 32,
         affine: bool = True) -> Tuple[int, int]:
  """(multiply-adds, parameters) of the network of cell `ops`.

  Multiply-adds count the convolutions (weights x output pixels) and the classifier
  (in x out), like `spos.cost`; the benchmark's own FLOPs also add the classifier's
  bias (num_classes more) and likewise leave out pooling. Parameters include BN
  scales and biases and the classifier bias. `affine=False` counts the cells' BNs
  without parameters, as one path of the supernet has them.
  """
  ops = check(ops)
  if image_size % 4:
    raise ValueError(f'image_size must be divisible by 4 (two reductions), got {image_size}')
  macs = params = 0

  def conv(cin, cout, kernel, side, bn_params):
    nonlocal macs, params
    weights = cin * cout * kernel * kernel
    macs += weights * side * side
    params += weights + bn_params

  side = image_size
  conv(3, channels, 3, side, 2 * channels)
  for stage in range(3):
    width = channels * 2 ** stage
    if stage:
      side //= 2
      conv(width // 2, width, 3, side, 2 * width)
      conv(width, width, 3, side, 2 * width)
      conv(width // 2, width, 1, side, 0)  # the shortcut has no BN
    for _ in range(cells_per_stage):
      for op in ops:
        if OPS[op] in KERNELS:
          conv(width, width, KERNELS[OPS[op]], side, 2 * width if affine else 0)
  width = 4 * channels
  params += 2 * width  # last BN
  macs += width * num_classes
  params += width * num_classes + num_classes
  return macs, params
