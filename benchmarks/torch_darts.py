"""The torch twin of the DARTS search network (`models.darts.DARTSSearchNet`) for
benchmarks/compare_torch.py's darts_second_order row: the stem, the search cells (their
inputs preprocessed, every edge a MixedEdge over `darts.PRIMITIVES`, reduction cells where
`darts.reduction_layers` puts them), the classifier; `forward(images, alphas)` takes the
architecture logits {'normal', 'reduce'} and softmaxes each edge's row, as the Flax network
does. BatchNorms as in the search network: affine in the stem, without affine parameters in
the cells. Imports nothing that imports TensorFlow.

Names: the Flax search cell runs its edges as two `nn.scan`s over stacked parameters
(`cell{i}/edges_from_inputs/edge/...` with a leading axis of the 8 edges that read the
cell's inputs, `edges_from_nodes` the 6 between nodes, in the scans' order
`darts.INPUT_EDGES` / `darts.NODE_EDGES`). `unstack_edges` splits those stacks into one
subtree per edge, keyed by its scan position, and the torch module is named so that
`convert.torch_key` maps every unstacked Flax variable to its tensor:
`cell0.edges_from_inputs.3.sep_conv_3x3.SepConv.0.dw0.weight`. A Flax submodule that
takes its class's name (`Conv_0`, `SepConv_0`) is `convert.torch_key`'s `Conv.0`: a list
of one module here. `load_search_variables` fills the module that way.

'none' has no module: the Flax MixedEdge skips it (its weight times zero adds nothing and
gets a zero gradient), and so does the twin.
"""
import os
from collections.abc import Mapping
from typing import Any, Dict

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # before JAX starts: both sides on the CPU

import jax
import torch
import torch.nn.functional as F
import torch_parity as tp  # benchmarks/; sets JAX_PLATFORMS before JAX starts
from torch import nn as tnn

from dfnas_jax.models import darts

SCANS = ('edges_from_inputs', 'edges_from_nodes')  # SearchCell's two edge scans
SCANNED = 'edge'  # the scanned module's name in either


class TorchBatchNorm(tnn.BatchNorm2d):
  """BatchNorm2d (PyTorch's momentum 0.1 and eps 1e-5, as `darts.batch_norm`); with
  `update_stats` False, training mode normalizes with the batch statistics and leaves the
  running ones alone, as the architecture step does (it drops the BatchNorm updates)."""
  update_stats = True

  def forward(self, x):
    if self.training and not self.update_stats:
      return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
    return super().forward(x)


def _one(module: tnn.Module) -> tnn.ModuleList:
  """A Flax submodule named after its class, `Name_0`: torch's `Name.0`."""
  return tnn.ModuleList([module])


class TorchReLUConvBN(tnn.Module):
  """darts.ReLUConvBN (1x1, stride 1, as the cells' preprocessing uses it)."""

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.Conv = _one(tnn.Conv2d(cin, cout, 1, bias=False))
    self.BatchNorm = _one(TorchBatchNorm(cout, affine=False))

  def forward(self, x):
    return self.BatchNorm[0](self.Conv[0](F.relu(x)))


class TorchFactorizedReduce(tnn.Module):
  """darts.FactorizedReduce: two stride-2 1x1 convolutions, the second one pixel in."""

  def __init__(self, cin: int, cout: int):
    super().__init__()
    half = cout // 2
    self.conv = tnn.ModuleDict({'1': tnn.Conv2d(cin, half, 1, 2, bias=False),
                                '2': tnn.Conv2d(cin, cout - half, 1, 2, bias=False)})
    self.BatchNorm = _one(TorchBatchNorm(cout, affine=False))

  def forward(self, x):
    x = F.relu(x)
    return self.BatchNorm[0](torch.cat([self.conv['1'](x), self.conv['2'](x[:, :, 1:, 1:])], 1))


def _depthwise(channels: int, kernel: int, stride: int, dilation: int = 1) -> tnn.Conv2d:
  """layers.depthwise_conv: 'same' padding dilation * (k - 1) // 2."""
  return tnn.Conv2d(channels, channels, kernel, stride, dilation * (kernel - 1) // 2,
                    dilation=dilation, groups=channels, bias=False)


class TorchSepConv(tnn.Module):
  """darts.SepConv: (ReLU, depthwise, pointwise, BN) twice, the first strided."""

  def __init__(self, channels: int, cout: int, kernel: int, stride: int):
    super().__init__()
    self.dw0 = _depthwise(channels, kernel, stride)
    self.pw0 = tnn.Conv2d(channels, channels, 1, bias=False)
    self.bn0 = TorchBatchNorm(channels, affine=False)
    self.dw1 = _depthwise(channels, kernel, 1)
    self.pw1 = tnn.Conv2d(channels, cout, 1, bias=False)
    self.bn1 = TorchBatchNorm(cout, affine=False)

  def forward(self, x):
    x = self.bn0(self.pw0(self.dw0(F.relu(x))))
    return self.bn1(self.pw1(self.dw1(F.relu(x))))


class TorchDilConv(tnn.Module):
  """darts.DilConv: ReLU, depthwise with dilation 2, pointwise, BN."""

  def __init__(self, channels: int, cout: int, kernel: int, stride: int):
    super().__init__()
    self.dw = _depthwise(channels, kernel, stride, dilation=2)
    self.pw = tnn.Conv2d(channels, cout, 1, bias=False)
    self.BatchNorm = _one(TorchBatchNorm(cout, affine=False))

  def forward(self, x):
    return self.BatchNorm[0](self.pw(self.dw(F.relu(x))))


class TorchOperation(tnn.Module):
  """darts.Operation(search=True), one primitive but 'none': pooling (padding excluded
  from the average) and a BN without affine parameters, identity or FactorizedReduce,
  separable or dilated convolutions."""

  def __init__(self, primitive: str, channels: int, stride: int):
    super().__init__()
    self.primitive, self.stride = primitive, stride
    if primitive.endswith('pool_3x3'):
      self.BatchNorm = _one(TorchBatchNorm(channels, affine=False))
    elif primitive == 'skip_connect' and stride > 1:
      self.FactorizedReduce = _one(TorchFactorizedReduce(channels, channels))
    elif primitive.startswith('sep_conv'):
      self.SepConv = _one(TorchSepConv(channels, channels, int(primitive[-1]), stride))
    elif primitive.startswith('dil_conv'):
      self.DilConv = _one(TorchDilConv(channels, channels, int(primitive[-1]), stride))
    elif primitive != 'skip_connect':
      raise ValueError(f'No torch twin of the DARTS operation {primitive!r}')

  def forward(self, x):
    p, s = self.primitive, self.stride
    if p == 'max_pool_3x3':
      return self.BatchNorm[0](F.max_pool2d(x, 3, s, 1))
    if p == 'avg_pool_3x3':
      return self.BatchNorm[0](F.avg_pool2d(x, 3, s, 1, count_include_pad=False))
    if p == 'skip_connect':
      return x if s == 1 else self.FactorizedReduce[0](x)
    return (self.SepConv if p.startswith('sep_conv') else self.DilConv)[0](x)


class TorchMixedEdge(tnn.Module):
  """darts.MixedEdge: sum_k weights[k] * PRIMITIVES[k](x), in the primitives' order."""

  def __init__(self, channels: int, stride: int):
    super().__init__()
    self.ops = [(k, p) for k, p in enumerate(darts.PRIMITIVES) if p != 'none']
    for _, primitive in self.ops:
      setattr(self, primitive, TorchOperation(primitive, channels, stride))

  def forward(self, x, weights):
    total = 0.0
    for k, primitive in self.ops:
      total = total + weights[k] * getattr(self, primitive)(x)
    return total


class TorchSearchCell(tnn.Module):
  """darts.SearchCell: node i sums edge (i, j) on state j over j < i + 2 (states 0, 1: the
  preprocessed inputs), in that order, as the Flax scans add them; the output
  concatenates the nodes. Edge (i, j) is `edges_from_inputs[k]` (j < 2) or
  `edges_from_nodes[k]`, k its position in that scan, and reads row
  `darts._edges(i)[j]` of the cell type's weights."""

  def __init__(self, cin_prev_prev: int, cin_prev: int, channels: int, reduction: bool,
               reduction_prev: bool):
    super().__init__()
    self.preprocess0 = (TorchFactorizedReduce(cin_prev_prev, channels) if reduction_prev
                        else TorchReLUConvBN(cin_prev_prev, channels))
    self.preprocess1 = TorchReLUConvBN(cin_prev, channels)
    stride = 2 if reduction else 1
    self.edges_from_inputs = tnn.ModuleList([TorchMixedEdge(channels, stride)
                                             for _ in darts.INPUT_EDGES])
    self.edges_from_nodes = tnn.ModuleList([TorchMixedEdge(channels, 1)
                                            for _ in darts.NODE_EDGES])
    self.plan = []  # per node: (source state, scan, position, weight row) of each edge
    for node in range(darts.NUM_NODES):
      first_row = node * (node + 3) // 2  # sum(2 + i for i < node): darts._edges
      self.plan.append([
          (j, SCANS[0], darts.INPUT_EDGES.index((node, j)), first_row + j) if j < 2 else
          (j, SCANS[1], darts.NODE_EDGES.index((node, j)), first_row + j)
          for j in range(node + 2)])

  def forward(self, s0, s1, weights):
    states = [self.preprocess0(s0), self.preprocess1(s1)]
    for edges in self.plan:
      total = 0.0
      for j, scan, position, row in edges:
        total = total + getattr(self, scan)[position](states[j], weights[row])
      states.append(total)
    return torch.cat(states[2:], 1)


class TorchDARTSSearchNet(tnn.Module):
  """A Flax `darts.DARTSSearchNet` in torch; `forward(images, alphas)`: NCHW images in
  [0, 1], alphas {'normal', 'reduce'} [NUM_EDGES, len(PRIMITIVES)] logits."""

  def __init__(self, module: darts.DARTSSearchNet):
    super().__init__()
    self.register_buffer('mean', torch.tensor(module.mean).view(1, 3, 1, 1), persistent=False)
    self.register_buffer('std', torch.tensor(module.std).view(1, 3, 1, 1), persistent=False)
    stem = module.stem_multiplier * module.init_channels
    self.stem_conv = tnn.Conv2d(3, stem, 3, 1, 1, bias=False)
    self.stem_bn = TorchBatchNorm(stem)
    cin_prev_prev = cin_prev = stem
    self.reductions = []
    for i, channels, reduction, reduction_prev in darts.cell_plan(module.init_channels,
                                                                  module.layers):
      setattr(self, f'cell{i}', TorchSearchCell(cin_prev_prev, cin_prev, channels, reduction,
                                                reduction_prev))
      self.reductions.append(reduction)
      cin_prev_prev, cin_prev = cin_prev, darts.NUM_NODES * channels
    self.classifier = tnn.Linear(cin_prev, module.num_classes)

  def forward(self, images, alphas: Dict[str, torch.Tensor]):
    weights = {t: F.softmax(alphas[t], -1) for t in darts.CELL_TYPES}
    s0 = s1 = self.stem_bn(self.stem_conv((images - self.mean) / self.std))  # no ReLU
    for i, reduction in enumerate(self.reductions):
      s0, s1 = s1, getattr(self, f'cell{i}')(s0, s1, weights['reduce' if reduction else 'normal'])
    return self.classifier(s1.mean((2, 3)))

  def update_batch_stats(self, update: bool) -> None:
    """Whether training-mode forward passes update the BatchNorms' running statistics."""
    for m in self.modules():
      if isinstance(m, TorchBatchNorm):
        m.update_stats = update


class TorchAtInputSize(tnn.Module):
  """teachers.AtInputSize: the teacher sees images resized to its input size as
  `jax.image.resize(..., 'bilinear')` resizes them (half-pixel centres, the kernel
  widened when shrinking, weights renormalized at the borders: torch's antialiased
  bilinear interpolation)."""

  def __init__(self, teacher: tnn.Module, image_size: int):
    super().__init__()
    self.teacher, self.image_size = teacher, image_size

  def forward(self, images):
    if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
      images = F.interpolate(images, (self.image_size, self.image_size), mode='bilinear',
                             align_corners=False, antialias=True)
    return self.teacher(images)


# --- Flax variables -> the twin -----------------------------------------------------------

def unstack_edges(tree) -> Any:
  """`tree` (variables, or any tree shaped like them) with each scanned `edge` subtree,
  whose leaves stack n edges, replaced by n subtrees keyed '0' .. 'n-1' (scan positions)."""
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for name, sub in tree.items():
    if name in SCANS and isinstance(sub, Mapping) and set(sub) == {SCANNED}:
      stacked = sub[SCANNED]
      count = jax.tree_util.tree_leaves(stacked)[0].shape[0]
      out[name] = {str(k): jax.tree_util.tree_map(lambda x, k=k: x[k], stacked)
                   for k in range(count)}
    else:
      out[name] = unstack_edges(sub)
  return out


def load_search_variables(model: TorchDARTSSearchNet, variables) -> None:
  """Copies Flax {'params', 'batch_stats'} of the search network into `model`, the
  scanned edges unstacked; they must cover it exactly (`tp.load_flax_variables`)."""
  tp.load_flax_variables(model, unstack_edges(jax.device_get(variables)))
