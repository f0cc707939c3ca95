"""The DARTS cell search space (Liu et al., 2019), in Flax.

A cell has two inputs (the outputs of the two previous cells), NUM_NODES
intermediate nodes and NUM_EDGES edges: node i sums one operation on each of
the i + 2 earlier states. Its output concatenates the intermediate nodes.

- `DARTSSearchNet`: every edge is a MixedEdge, the softmax(alpha)-weighted sum of
  all PRIMITIVES. The architecture logits are an *input* ({'normal': [14, 8],
  'reduce': [14, 8]}), not a variable, so the bilevel optimizer treats weights and
  alphas as two separate pytrees. BatchNorms have no affine parameters.
- `derive_genotype(alphas)`: for each node, the two strongest incoming edges
  (largest non-'none' weight), each with its strongest non-'none' operation.
- `DARTSNet(genotype)`: the stand-alone network of a genotype for retraining,
  with an optional auxiliary head and drop-path.

Names: `architecture_name(genotype, 36, 20, auxiliary=True, drop_path=0.2)` is
'darts:36x20+aux+dp0.2:sep_conv_3x3@0,...|max_pool_3x3@0,...', which
`dfnas_jax.models.build_model` accepts like any zoo name.
"""
import dataclasses
import re
from functools import partial
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dfnas_jax.models import layers
from dfnas_jax.models.layers import DepthwiseConv, conv_init, out_side
from dfnas_jax.models.resnet import CIFAR10_MEAN, CIFAR10_STD

PRIMITIVES = ('none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect', 'sep_conv_3x3',
              'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')
NUM_NODES = 4
NUM_EDGES = sum(2 + i for i in range(NUM_NODES))  # 14
CELL_TYPES = ('normal', 'reduce')
CPU_DEPTHWISE = 'dense'  # see layers.depthwise_conv


@dataclasses.dataclass(frozen=True)
class Genotype:
  """Two (operation, input state) pairs per node, for normal and reduction cells.

  Inputs 0 and 1 are the cell's inputs, 2 + i is intermediate node i.
  """
  normal: Tuple[Tuple[str, int], ...]
  reduce: Tuple[Tuple[str, int], ...]
  normal_concat: Tuple[int, ...] = tuple(range(2, 2 + NUM_NODES))
  reduce_concat: Tuple[int, ...] = tuple(range(2, 2 + NUM_NODES))

  def to_json(self) -> Dict[str, Any]:
    return {'normal': [list(e) for e in self.normal], 'reduce': [list(e) for e in self.reduce],
            'normal_concat': list(self.normal_concat),
            'reduce_concat': list(self.reduce_concat)}

  @classmethod
  def from_json(cls, d: Dict[str, Any]) -> 'Genotype':
    return cls(tuple((str(op), int(i)) for op, i in d['normal']),
               tuple((str(op), int(i)) for op, i in d['reduce']),
               tuple(d.get('normal_concat', range(2, 2 + NUM_NODES))),
               tuple(d.get('reduce_concat', range(2, 2 + NUM_NODES))))


def batch_norm(train: bool, affine: bool, axis_name: Optional[str], dtype, name=None):
  """PyTorch BatchNorm2d defaults (momentum 0.1 = flax 0.9, eps 1e-5)."""
  return layers.batch_norm(train, 0.9, axis_name, dtype, affine=affine)(name=name)


class _Block(nn.Module):
  """Shared settings of every operation."""
  features: int
  stride: int = 1
  affine: bool = True
  axis_name: Optional[str] = 'batch'
  dtype: Any = jnp.float32

  def norm(self, train, name=None):
    return batch_norm(train, self.affine, self.axis_name, self.dtype, name)

  def conv1x1(self, x, features, stride=1, name=None):
    return nn.Conv(features, (1, 1), (stride, stride), padding='VALID', use_bias=False,
                   kernel_init=conv_init, dtype=self.dtype, name=name)(x)


class ReLUConvBN(_Block):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return self.norm(train)(self.conv1x1(nn.relu(x), self.features, self.stride))


class FactorizedReduce(_Block):
  """Halves the resolution: two stride-2 1x1 convolutions, one offset by a pixel."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(x)
    half = self.features // 2
    y = jnp.concatenate([self.conv1x1(x, half, 2, name='conv_1'),
                         self.conv1x1(x[:, 1:, 1:], self.features - half, 2, name='conv_2')],
                        axis=-1)
    return self.norm(train)(y)


class SepConv(_Block):
  """(ReLU, depthwise k x k, pointwise, BN) twice; only the first is strided."""
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    channels = x.shape[-1]
    for i, (stride, features) in enumerate(((self.stride, channels), (1, self.features))):
      x = DepthwiseConv(self.kernel_size, stride, self.dtype, cpu_method=CPU_DEPTHWISE,
                        name=f'dw{i}')(nn.relu(x))
      x = self.norm(train, name=f'bn{i}')(self.conv1x1(x, features, name=f'pw{i}'))
    return x


class DilConv(_Block):
  """ReLU, depthwise k x k with dilation 2, pointwise, BN."""
  kernel_size: int = 3

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = DepthwiseConv(self.kernel_size, self.stride, self.dtype, dilation=2,
                      cpu_method=CPU_DEPTHWISE, name='dw')(nn.relu(x))
    return self.norm(train)(self.conv1x1(x, self.features, name='pw'))


class Operation(_Block):
  """One of PRIMITIVES. `search=True` follows pooling with an affine-free BN (as the reference)."""
  primitive: str = 'skip_connect'
  search: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    p, s = self.primitive, self.stride
    settings = dict(features=self.features, stride=s, affine=self.affine,
                    axis_name=self.axis_name, dtype=self.dtype)
    if p == 'none':
      return jnp.zeros_like(x[:, ::s, ::s])
    if p in ('max_pool_3x3', 'avg_pool_3x3'):
      pool = nn.max_pool if p == 'max_pool_3x3' else partial(nn.avg_pool, count_include_pad=False)
      y = pool(x, (3, 3), (s, s), padding=((1, 1), (1, 1)))
      return batch_norm(train, False, self.axis_name, self.dtype)(y) if self.search else y
    if p == 'skip_connect':
      return x if s == 1 else FactorizedReduce(**settings)(x, train)
    if p.startswith('sep_conv'):
      return SepConv(**settings, kernel_size=int(p[-1]))(x, train)
    if p.startswith('dil_conv'):
      return DilConv(**settings, kernel_size=int(p[-1]))(x, train)
    raise ValueError(f'Unknown DARTS operation {p!r}; known: {PRIMITIVES}')


def _edges(node: int) -> range:
  """Indices into the [NUM_EDGES, ...] architecture arrays of node `node`'s inputs."""
  start = sum(2 + i for i in range(node))
  return range(start, start + node + 2)


class _Cell(_Block):
  reduction: bool = False
  reduction_prev: bool = False

  def preprocess(self, s0, s1, train):
    if self.reduction_prev:
      s0 = FactorizedReduce(self.features, 2, self.affine, self.axis_name, self.dtype,
                            name='preprocess0')(s0, train)
    else:
      s0 = ReLUConvBN(self.features, 1, self.affine, self.axis_name, self.dtype,
                      name='preprocess0')(s0, train)
    s1 = ReLUConvBN(self.features, 1, self.affine, self.axis_name, self.dtype,
                    name='preprocess1')(s1, train)
    return s0, s1

  def op(self, primitive, state_index, name, search=False):
    stride = 2 if self.reduction and state_index < 2 else 1
    return Operation(self.features, stride, self.affine, self.axis_name, self.dtype,
                     primitive=primitive, search=search, name=name)


class MixedEdge(_Block):
  """One edge of the search network: sum_k weights[k] * PRIMITIVES[k](x)."""
  train: bool = False

  @nn.compact
  def __call__(self, x, weights):
    total = 0.
    for k, primitive in enumerate(PRIMITIVES):
      if primitive == 'none':  # contributes weight * 0
        continue
      y = Operation(self.features, self.stride, self.affine, self.axis_name, self.dtype,
                    primitive=primitive, search=True, name=primitive)(x, self.train)
      total = total + weights[k].astype(y.dtype) * y
    return total


class _EdgeScanStep(_Block):
  """Scan body: one MixedEdge reads state `source` and adds to node `target`.

  The carry is (inputs, nodes): the cell's two preprocessed inputs (None once
  only node states are read) and the running sums of the four nodes.
  """
  train: bool = False

  @nn.compact
  def __call__(self, carry, edge):
    inputs, nodes = carry
    source, target, weights = edge
    x = (nodes if inputs is None else inputs)[source]
    y = MixedEdge(self.features, self.stride, self.affine, self.axis_name, self.dtype,
                  train=self.train, name='edge')(x, weights)
    return (inputs, nodes.at[target].add(y)), None


# Edge order of the two scans of a search cell: (node, source state).
INPUT_EDGES = tuple((node, j) for node in range(NUM_NODES) for j in (0, 1))
NODE_EDGES = tuple((node, j) for node in range(1, NUM_NODES) for j in range(2, node + 2))


class SearchCell(_Cell):
  """Every edge is the `weights`-weighted sum of all PRIMITIVES.

  The 14 edges run as two `nn.scan`s over stacked parameters: the 8 edges from
  the cell's inputs, then the 6 between nodes in dependency order (a node's
  inputs are complete before it is read). XLA compiles each MixedEdge once per
  scan instead of 14 times, which on CPU decides whether the bilevel step
  compiles in minutes or in most of an hour; unlike `vmap`, `scan` keeps the
  convolutions ungrouped, which XLA:CPU runs far faster.
  """

  @nn.compact
  def __call__(self, s0, s1, weights, train: bool = False):
    inputs = jnp.stack(self.preprocess(s0, s1, train))
    stride = 2 if self.reduction else 1
    side = out_side(inputs.shape[2], stride), out_side(inputs.shape[3], stride)
    nodes = jnp.zeros((NUM_NODES, inputs.shape[1], *side, self.features), inputs.dtype)

    def scan(edges, carry, stride, name):
      body = nn.scan(_EdgeScanStep, variable_axes={'params': 0, 'batch_stats': 0},
                     split_rngs={'params': True}, length=len(edges))
      rows = np.asarray([_edges(node)[j] for node, j in edges])
      sources = np.asarray([j if carry[0] is not None else j - 2 for _, j in edges])
      targets = np.asarray([node for node, _ in edges])
      (_, nodes), _ = body(self.features, stride, self.affine, self.axis_name, self.dtype,
                           train=train, name=name)(carry, (sources, targets, weights[rows]))
      return nodes

    nodes = scan(INPUT_EDGES, (inputs, nodes), stride, 'edges_from_inputs')
    nodes = scan(NODE_EDGES, (None, nodes), 1, 'edges_from_nodes')
    return jnp.concatenate(list(nodes), axis=-1)


class GenotypeCell(_Cell):
  genotype: Optional[Genotype] = None
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, s0, s1, train: bool = False):
    gene = self.genotype.reduce if self.reduction else self.genotype.normal
    concat = self.genotype.reduce_concat if self.reduction else self.genotype.normal_concat
    states = list(self.preprocess(s0, s1, train))
    for node in range(len(gene) // 2):
      total = 0.
      for e in (2 * node, 2 * node + 1):
        primitive, j = gene[e]
        y = self.op(primitive, j, f'node{node}_{e % 2}_{primitive}')(states[j], train)
        identity = primitive == 'skip_connect' and not (self.reduction and j < 2)
        if train and self.drop_path > 0 and not identity:
          keep = 1.0 - self.drop_path
          mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (y.shape[0], 1, 1, 1))
          y = y * mask.astype(y.dtype) / keep
        total = total + y
      states.append(total)
    return jnp.concatenate([states[i] for i in concat], axis=-1)


def reduction_layers(layers: int) -> Tuple[int, int]:
  return layers // 3, 2 * layers // 3


def cell_plan(init_channels: int, layers: int):
  """(index, channels, reduction, reduction_prev) of each cell; reductions double channels."""
  channels, reduction_prev = init_channels, False
  for i in range(layers):
    reduction = i in reduction_layers(layers)
    channels = channels * 2 if reduction else channels
    yield i, channels, reduction, reduction_prev
    reduction_prev = reduction


class CellNetwork(nn.Module):
  """What the search network and a genotype's network share: a stem of
  stem_multiplier * init_channels, `layers` cells (`cell_plan`), a linear classifier."""
  num_classes: int
  init_channels: int = 16
  layers: int = 8
  stem_multiplier: int = 3
  mean: Tuple[float, ...] = CIFAR10_MEAN
  std: Tuple[float, ...] = CIFAR10_STD
  axis_name: Optional[str] = 'batch'
  dtype: Any = jnp.float32

  def stem(self, images, train: bool):
    """Normalize, 3x3 convolution, BN."""
    x = layers.normalize(images, self.mean, self.std, self.dtype)
    x = nn.Conv(self.stem_multiplier * self.init_channels, (3, 3), padding=((1, 1), (1, 1)),
                use_bias=False, kernel_init=conv_init, dtype=self.dtype, name='stem_conv')(x)
    return batch_norm(train, True, self.axis_name, self.dtype, name='stem_bn')(x)

  def classify(self, x):
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x).astype(jnp.float32)


class DARTSSearchNet(CellNetwork):
  """The over-parameterized network; `alphas` = {'normal', 'reduce'} logits [NUM_EDGES, 8]."""

  @nn.compact
  def __call__(self, images, alphas=None, train: bool = False):
    if alphas is None:
      alphas = initial_alphas(None)
    weights = {t: jax.nn.softmax(alphas[t].astype(jnp.float32), axis=-1) for t in CELL_TYPES}
    s0 = s1 = self.stem(images, train)
    for i, channels, reduction, reduction_prev in cell_plan(self.init_channels, self.layers):
      cell = SearchCell(channels, 1, False, self.axis_name, self.dtype, reduction=reduction,
                        reduction_prev=reduction_prev, name=f'cell{i}')
      s0, s1 = s1, cell(s0, s1, weights['reduce' if reduction else 'normal'], train)
    return self.classify(s1)


class AuxiliaryHead(nn.Module):
  """Reference CIFAR head (ReLU, 5x5/3 avg-pool, 1x1 conv 128, 2x2 conv 768, linear).

  The last convolution spans the whole remaining map, so other input sizes work.
  """
  num_classes: int
  axis_name: Optional[str] = 'batch'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(x)
    if x.shape[1] >= 5:
      x = nn.avg_pool(x, (5, 5), (3, 3), padding='VALID')
    for i, (features, kernel) in enumerate(((128, 1), (768, x.shape[1]))):
      x = nn.Conv(features, (kernel, kernel), padding='VALID', use_bias=False,
                  kernel_init=conv_init, dtype=self.dtype, name=f'conv{i}')(x)
      x = nn.relu(batch_norm(train, True, self.axis_name, self.dtype, name=f'bn{i}')(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x).astype(jnp.float32)


class DARTSNet(CellNetwork, kw_only=True):
  """The stand-alone network of a genotype (keyword arguments only). With `auxiliary`,
  training sows `intermediates/aux_logits` from a head after the second reduction cell."""
  genotype: Genotype
  init_channels: int = 36
  layers: int = 20
  auxiliary: bool = False
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, images, train: bool = False):
    s0 = s1 = self.stem(images, train)
    for i, channels, reduction, reduction_prev in cell_plan(self.init_channels, self.layers):
      cell = GenotypeCell(channels, 1, True, self.axis_name, self.dtype, reduction=reduction,
                          reduction_prev=reduction_prev, genotype=self.genotype,
                          drop_path=self.drop_path, name=f'cell{i}')
      s0, s1 = s1, cell(s0, s1, train)
      if self.auxiliary and i == reduction_layers(self.layers)[1] and (
          train or self.is_initializing()):
        aux = AuxiliaryHead(self.num_classes, self.axis_name, self.dtype, name='aux_head')(
            s1, train)
        self.sow('intermediates', 'aux_logits', aux)
    return self.classify(s1)


# --- Architecture parameters and genotypes ------------------------------------------------

def initial_alphas(rng: Optional[jax.Array], scale: float = 1e-3) -> Dict[str, jax.Array]:
  """{'normal', 'reduce'}: scale * N(0, 1) logits [NUM_EDGES, len(PRIMITIVES)] (zeros if no rng)."""
  shape = (NUM_EDGES, len(PRIMITIVES))
  if rng is None:
    return {t: jnp.zeros(shape) for t in CELL_TYPES}
  return {t: scale * jax.random.normal(r, shape)
          for t, r in zip(CELL_TYPES, jax.random.split(rng, 2))}


def derive_genotype(alphas) -> Genotype:
  """Per node the 2 incoming edges with the largest non-'none' weight, and that operation."""
  none = PRIMITIVES.index('none')
  genes = {}
  for t in CELL_TYPES:
    weights = np.array(jax.nn.softmax(jnp.asarray(alphas[t], jnp.float32), axis=-1))
    weights[:, none] = -np.inf
    gene = []
    for node in range(NUM_NODES):
      edges = list(_edges(node))
      strongest = sorted(range(len(edges)), key=lambda j: -weights[edges[j]].max())[:2]
      gene += [(PRIMITIVES[int(weights[edges[j]].argmax())], j) for j in strongest]
    genes[t] = tuple(gene)
  return Genotype(genes['normal'], genes['reduce'])


_NAME = re.compile(r'darts:(\d+)x(\d+)(\+aux)?(?:\+dp([0-9.]+))?:([\w@,]+)\|([\w@,]+)')


def architecture_name(genotype: Genotype, init_channels: int, layers: int,
                      auxiliary: bool = False, drop_path: float = 0.0) -> str:
  def cell(gene):
    return ','.join(f'{op}@{j}' for op, j in gene)
  options = ('+aux' if auxiliary else '') + (f'+dp{drop_path:g}' if drop_path else '')
  return f'darts:{init_channels}x{layers}{options}:{cell(genotype.normal)}|{cell(genotype.reduce)}'


def parse_name(name: str) -> Dict[str, Any]:
  """`architecture_name`'s inverse: DARTSNet's keyword arguments."""
  match = _NAME.fullmatch(name)
  if not match:
    raise ValueError(f'{name!r} is not a DARTS architecture: expected '
                     "'darts:<channels>x<layers>[+aux][+dp<p>]:<op>@<input>,...|<op>@<input>,...' "
                     '(8 pairs per cell type, as written by the darts stage).')
  channels, layers, aux, drop_path, normal, reduce = match.groups()

  def cell(text):
    gene = tuple((op, int(j)) for op, j in (e.split('@') for e in text.split(',')))
    unknown = [op for op, _ in gene if op not in PRIMITIVES or op == 'none']
    if len(gene) != 2 * NUM_NODES or unknown:
      raise ValueError(f'{name!r}: a cell needs {2 * NUM_NODES} op@input pairs with ops from '
                       f'{PRIMITIVES[1:]}; got {len(gene)} pairs, unknown {unknown}')
    for e, (_, j) in enumerate(gene):
      if not 0 <= j < 2 + e // 2:
        raise ValueError(f'{name!r}: pair {e} reads state {j}, but node {e // 2} can only '
                         f'read states 0..{1 + e // 2}')
    return gene
  return dict(genotype=Genotype(cell(normal), cell(reduce)), init_channels=int(channels),
              layers=int(layers), auxiliary=bool(aux), drop_path=float(drop_path or 0.0))


def genotype_json(genotype: Genotype, alphas) -> Dict[str, Any]:
  """What the search writes each epoch: the genotype and the softmaxed weights."""
  return {**genotype.to_json(), 'primitives': list(PRIMITIVES),
          'weights': {t: np.asarray(jax.nn.softmax(jnp.asarray(alphas[t]), -1)).round(4).tolist()
                      for t in CELL_TYPES}}


def edge_labels() -> Sequence[str]:
  """'node i <- state j' for every row of an architecture array."""
  return [f'n{node} <- {j}' for node in range(NUM_NODES) for j in range(node + 2)]
