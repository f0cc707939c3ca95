"""compare_torch.py's row `nb201_supernet`: the SPOS supernet step on NAS-Bench-201 as
configs/spos.py:nb201 trains it (`spos.SupernetBench` on that space), and the torch twin of
the one-shot supernet (`models.nb201.NB201Net`, ops=None): every op of every edge of every
cell, the cell architecture (one op index per edge) an input of `forward`. Module names
follow the Flax variables, so `parity.load_flax_variables` fills it.
"""
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn as tnn

from dfnas_jax.models import nb201

from . import parity as tp  # noqa: F401  # sets JAX_PLATFORMS before JAX starts
from . import spos


class TorchReLUConvBN(tnn.Module):
  """nb201._Block.relu_conv_bn: ReLU, convolution with padding (k - 1) // 2 and no bias,
  BatchNorm (PyTorch's momentum 0.1 and eps 1e-5, as the Flax side)."""

  def __init__(self, cin: int, cout: int, kernel: int, stride: int, affine: bool):
    super().__init__()
    self.conv = tnn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, bias=False)
    self.bn = tnn.BatchNorm2d(cout, affine=affine)

  def forward(self, x):
    return self.bn(self.conv(F.relu(x)))


class TorchZero(tnn.Module):
  """'none'. x * 0, not a fresh zero tensor: the op before it stays in the graph and gets a
  zero gradient (not None), so SGD still applies weight decay and momentum to it, as the
  JAX step does to every choice on the path (`layers.keep_unused` keys on the path only)."""

  def forward(self, x):
    return x * 0.0


class TorchIdentity(tnn.Module):
  """'skip_connect'."""

  def forward(self, x):
    return x


class TorchAvgPool(tnn.Module):
  """'avg_pool_3x3': border windows average only the pixels inside the map."""

  def forward(self, x):
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def torch_operation(op: int, channels: int) -> tnn.Module:
  """nb201.Operation(op) of a supernet cell (BatchNorm without affine parameters)."""
  name = nb201.OPS[op]
  if name in nb201.KERNELS:
    return TorchReLUConvBN(channels, channels, nb201.KERNELS[name], 1, affine=False)
  return {'none': TorchZero, 'skip_connect': TorchIdentity,
          'avg_pool_3x3': TorchAvgPool}[name]()


class TorchChoiceEdge(tnn.Module):
  """nb201.ChoiceEdge: every op as `choices.{c}`."""

  def __init__(self, channels: int):
    super().__init__()
    self.choices = tnn.ModuleList([torch_operation(c, channels) for c in range(len(nb201.OPS))])


class TorchCell(tnn.Module):
  """nb201.Cell of the supernet: node j sums edge (j, i) on node i over i < j, edge e
  `layer{e}` running op path[e]; the output is node 3."""

  def __init__(self, channels: int):
    super().__init__()
    for e in range(nb201.NUM_EDGES):
      setattr(self, f'layer{e}', TorchChoiceEdge(channels))

  def forward(self, x, path):
    nodes = [x]
    for node in range(1, 4):
      nodes.append(sum(getattr(self, f'layer{e}').choices[path[e]](nodes[i])
                       for e, (j, i) in enumerate(nb201.EDGES) if j == node))
    return nodes[3]


class TorchResidualReduction(tnn.Module):
  """nb201.ResidualReduction: conv_b(conv_a(x)) (affine BatchNorms, conv_a at stride 2)
  plus 2x2 average pooling at stride 2, then a 1x1 convolution without BN."""

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.conv_a = TorchReLUConvBN(cin, cout, 3, 2, affine=True)
    self.conv_b = TorchReLUConvBN(cout, cout, 3, 1, affine=True)
    self.shortcut = tnn.Conv2d(cin, cout, 1, bias=False)

  def forward(self, x):
    y = self.conv_b(self.conv_a(x))
    return self.shortcut(F.avg_pool2d(x, 2, 2)) + y


class TorchNB201Supernet(tnn.Module):
  """A Flax NB201 supernet (`models.nb201.NB201Net` with ops=None) in torch;
  `forward(images, path[, dropout_mask])` runs one cell architecture in every cell (NCHW
  images in [0, 1])."""

  def __init__(self, module: nb201.NB201Net):
    super().__init__()
    if module.ops is not None:
      raise ValueError(f'Only the NB201 supernet (ops=None) has a torch twin here, got {module}')
    c, n = module.channels, module.cells_per_stage
    self.register_buffer('mean', torch.tensor(module.mean).view(1, 3, 1, 1), persistent=False)
    self.register_buffer('std', torch.tensor(module.std).view(1, 3, 1, 1), persistent=False)
    self.stem_conv = tnn.Conv2d(3, c, 3, 1, 1, bias=False)
    self.stem_bn = tnn.BatchNorm2d(c)
    for stage in range(3):
      width = c * 2 ** stage
      if stage:
        setattr(self, f'reduce{stage}', TorchResidualReduction(width // 2, width))
      for i in range(n):
        setattr(self, f'cell{stage * n + i}', TorchCell(width))
    self.cells_per_stage = n
    self.last_bn = tnn.BatchNorm2d(4 * c)
    self.classifier = tnn.Linear(4 * c, module.num_classes)
    self.dropout = module.dropout

  def forward(self, images, path, dropout_mask=None):
    path = [int(p) for p in path]
    x = self.stem_bn(self.stem_conv((images - self.mean) / self.std))  # no ReLU, as in Flax
    for stage in range(3):
      if stage:
        x = getattr(self, f'reduce{stage}')(x)
      for i in range(self.cells_per_stage):
        x = getattr(self, f'cell{stage * self.cells_per_stage + i}')(x, path)
    x = F.relu(self.last_bn(x)).mean((2, 3))
    if dropout_mask is not None:  # a given mask (the check: JAX's), applied as flax's Dropout
      x = torch.where(dropout_mask, x / (1.0 - self.dropout), torch.zeros_like(x))
    elif self.dropout:
      x = F.dropout(x, self.dropout, self.training)
    return self.classifier(x)


class NB201SupernetBench(spos.SupernetBench):
  """`SupernetBench` on the NAS-Bench-201 space as configs/spos.py:nb201 trains it: the path
  is the cell architecture (one op per edge, the same in every cell); the torch twin is
  `TorchNB201Supernet`."""
  name = 'nb201_supernet'
  preset = 'nb201'
  # Every op type: node 1 = 3x3 conv of the input, node 2 = 1x1 conv of the input + skip of
  # node 1, node 3 = avg pool of the input + 1x1 conv of node 1 + none of node 2. Node 2's
  # 1x1 conv is on the path but gets a zero gradient (only 'none' reads node 2): its update
  # is weight decay and momentum alone, on both sides (nb201.TorchZero).
  CHECK_PATH = (3, 2, 1, 4, 2, 0)

  def search_space(self, space: str):
    if not nb201.is_name(space) or nb201.parse_name(space)[2] is not None:
      raise ValueError(f"space={space!r}: this row runs NB201 supernets 'nb201[-<C>x<N>]'.")
    return space

  def draw_paths(self, count: int, rng: np.random.Generator):
    """Uniform over all cells, as the preset's path_sampling='uniform' with no FLOPs band."""
    if any(b > 0 for b in self.band):
      raise ValueError(f'FLOPs band {self.band}: this row draws uniformly over all cells.')
    return [tuple(int(op) for op in rng.integers(len(nb201.OPS), size=nb201.NUM_EDGES))
            for _ in range(count)]

  def check_path(self, seed: int):
    return self.CHECK_PATH

  def torch_supernet(self) -> tnn.Module:
    return TorchNB201Supernet(self.model)
