"""The DARTS search step for compare_torch.py, the row `darts_second_order`, and its
torch twin.

  darts_second_order  one step of `python -m dfnas_jax.main --config=configs/darts.py`
                      (`nas.bilevel.search_step`, built as `nas.darts.search` builds it):
                      the search network (C=8, 3 cells, 16 px, batch 16), the teacher's
                      logits computed in the step on the train and the val batch (each
                      resized to the teacher's 32 px), distillation at the config's
                      temperature. First the architecture step on the val batch: the
                      hypergradient of the validation loss after a virtual weight step
                      (`mode`: 'exact' differentiates through it, the config's default;
                      'finite_difference' is the reference's approximation), Adam with L2
                      weight decay on the logits. Then the weight step on the train batch
                      with the updated logits: SGD momentum 0.9, weight decay on kernels,
                      the gradient clipped at norm 5, the cosine learning rate.

The torch side runs the reference's second-order step
(quark0/darts cnn/architect.py, `_backward_step_unrolled`): the virtual step w' = w - lr
(momentum * buffer + grad + weight_decay * w), the validation loss at w' and its gradients,
the Hessian-vector product by finite differences at w +- R dw', R = r / ||dw'||, the
logits' gradient minus lr times it, torch.optim.Adam; then the weight step
(torch.optim.SGD, clip_grad_norm_). Where the reference and the JAX step differ, the twin
does what the JAX step does: weight decay on kernels only (also in the virtual step),
distillation from the teacher instead of labels, 'none' skipped in the mixed edges, and the
architecture step's forward passes leave the BatchNorms' running statistics alone.

Parity: JAX's 'finite_difference' step is the twin's arithmetic, so in that mode the check
requires the losses, the logits' hypergradient and update, Adam's moments and every weight
update to agree. In 'exact' mode the hypergradient is another estimator: the check reports
how far it is from the twin's finite difference (at the default config ~1e-1 in L2; Adam's
first step moves each logit by about lr times its gradient's sign, so the few logits whose
gradient is near zero move in opposite directions) and still requires the losses and the
weight update to agree, the twin's weight step fed JAX's updated logits (as the other rows
feed torch JAX's draws).

Imports nothing that imports TensorFlow: the step and its optimizers are the search's own
(`nas.bilevel`); the learning-rate schedule's length, which `nas.darts.search` takes from
the synthetic set's size, is computed here from the config (`search_steps`).

The twin of the DARTS search network (`models.darts.DARTSSearchNet`): the stem, the search
cells (their inputs preprocessed, every edge a MixedEdge over `darts.PRIMITIVES`, reduction
cells where `darts.reduction_layers` puts them), the classifier; `forward(images, alphas)` takes the
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
import copy
import os
from collections.abc import Mapping
from typing import Any, Dict

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # before JAX starts: both sides on the CPU

import flax.jax_utils
import jax
import numpy as np
import optax
import torch
import torch.nn.functional as F
from torch import nn as tnn

from dfnas_jax import teachers
from dfnas_jax.configs import darts as darts_config
from dfnas_jax.models import darts
from dfnas_jax.nas import bilevel
from dfnas_jax.teachers import convert
from dfnas_jax.train import state as state_lib
from dfnas_jax.train import steps

from . import parity as tp

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


# --- The row ---------------------------------------------------------------------------------

MODES = ('exact', 'finite_difference')


def search_steps(config, num_classes: int) -> int:
  """The search's weight steps on the config's synthetic set (`nas.darts.search`): per
  class, its share of images_per_round x num_rounds (balanced) less the half
  `search_data.load` holds out (rounded down), in whole batches, num_epochs times. Label
  calibration files later rounds by the teacher's labels, which may move the split by an
  image or two: the schedule's length only shapes the learning rate after the first step."""
  if config.dataset or config.train_split:
    raise ValueError('The benchmark sizes the learning-rate schedule from the synthetic set; '
                     'the config searches on another data set.')
  s = config.synthesis
  made = s.images_per_round * s.num_rounds
  per_class = [made // num_classes + (c < made % num_classes) for c in range(num_classes)]
  kept = made - sum(int(n * 0.5) for n in per_class)
  return config.num_epochs * (kept // config.batch_size)


class DartsSecondOrderBench:
  """`nas.bilevel.search_step` as the `darts` stage pmaps it, and its torch twin."""
  name = 'darts_second_order'

  def __init__(self, batch_size: int = 0, mode: str = 'exact', config=None):
    config = copy.deepcopy(config or darts_config.get_config())
    if mode not in MODES:
      raise ValueError(f'mode={mode!r}: this row runs the second-order modes {MODES}.')
    config.mode = mode
    if config.space != 'darts':
      raise ValueError(f"space={config.space!r}: this row runs the DARTS cell space 'darts'.")
    if config.loss != 'distillation' or config.soft_labels != 'teacher':
      raise ValueError('This row times distillation from the teacher computed in the step.')
    if config.compute_dtype != 'float32':
      raise ValueError('The torch twin computes in float32.')
    self.search_config, self.mode = config, mode
    self.batch = batch_size or config.batch_size
    self.teacher_module, self.teacher_variables, spec = teachers.load(
        config.teacher, config.teacher_checkpoint or None)
    self.teacher = teachers.AtInputSize(self.teacher_module, spec.image_size)  # retrain.py's
    self.classes, self.temperature = spec.num_classes, config.temperature
    # nas.darts.search's state and step.
    self.model = darts.DARTSSearchNet(spec.num_classes, config.init_channels, config.layers)
    num_steps = search_steps(config, spec.num_classes)
    tx, self.lr_fn = bilevel.weight_optimizer(config, num_steps)
    self.arch_tx = bilevel.arch_optimizer(config)
    weight_rng, alpha_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    alphas = darts.initial_alphas(alpha_rng)
    self.state0 = jax.device_get(state_lib.SearchState(
        weights=state_lib.create_train_state(self.model, weight_rng, config.image_size, tx),
        alphas=alphas, arch_opt_state=self.arch_tx.init(alphas)))
    self.p_step = bilevel.pmap_config_search_step(config, self.arch_tx, self.lr_fn,
                                                  self.teacher.apply)
    self.devices = jax.local_devices()[:1]
    self.r_teacher = steps.replicate(self.teacher_variables, self.devices)
    size = config.image_size
    rng = np.random.default_rng(config.seed)
    self.train_images, self.val_images = rng.random((2, self.batch, size, size, 3), np.float32)
    self.r_batches = tuple({'image': steps.replicate(x, self.devices)}
                           for x in (self.train_images, self.val_images))
    self.lrs = np.asarray(jax.vmap(self.lr_fn)(np.arange(num_steps + 1))).tolist()
    self.config = (f'darts C={config.init_channels}, {config.layers} cells, batch {self.batch}, '
                   f'{size} px, {mode} hypergradient (torch: finite difference, r '
                   f'{config.finite_difference_radius:g}), distillation T={config.temperature:g} '
                   f'from {spec.name} at {spec.image_size} px; SGD lr {self.lrs[0]:g} momentum '
                   f'{config.momentum:g} wd {config.weight_decay:g} (kernels) clip '
                   f'{config.grad_clip:g}; Adam lr {config.arch_learning_rate:g} betas '
                   f'({config.arch_b1:g}, {config.arch_b2:g}) wd {config.arch_weight_decay:g}')

    torch_teacher = tp.TorchCifarResNet(self.teacher_module).eval().requires_grad_(False)
    tp.load_flax_variables(torch_teacher, self.teacher_variables)
    self.torch_teacher = TorchAtInputSize(torch_teacher, spec.image_size)
    self.torch_model = TorchDARTSSearchNet(self.model).train()
    load_search_variables(self.torch_model, {
        'params': self.state0.weights.params, 'batch_stats': self.state0.weights.batch_stats})
    # The JAX step's decay mask (state_lib.kernels_only) is on the stacked edges' arrays:
    # carried to each edge's tensors, it names the torch tensors to decay.
    mask = jax.tree_util.tree_map(lambda p, m: np.full(p.shape, m), self.state0.weights.params,
                                  state_lib.kernels_only(self.state0.weights.params))
    self.decayed = {self.torch_name(k) for k, m in self.flat_params(mask).items() if m.all()}
    self.torch_train, self.torch_val = tp.nchw(self.train_images), tp.nchw(self.val_images)

  @staticmethod
  def flat_params(params):
    """{'params/...': array} of a parameter tree, the scanned edges unstacked."""
    return teachers.flatten_variables({'params': unstack_edges(params)})

  @staticmethod
  def torch_name(key: str) -> str:
    return convert.torch_key(tuple(key.split('/')))

  # --- The torch side ---

  def torch_state(self):
    """(model, weight optimizer, logits {'normal', 'reduce'}, logit optimizer): a copy of
    the initial weights, the initial logits, fresh optimizers."""
    c = self.search_config
    model = copy.deepcopy(self.torch_model)
    named = list(model.named_parameters())
    groups = [{'params': [p for n, p in named if n in self.decayed],
               'weight_decay': c.weight_decay},
              {'params': [p for n, p in named if n not in self.decayed], 'weight_decay': 0.0}]
    weight_opt = torch.optim.SGD([g for g in groups if g['params']], lr=self.lrs[0],
                                 momentum=c.momentum)
    alphas = {t: tnn.Parameter(tp.from_numpy(np.array(self.state0.alphas[t], np.float32)))
              for t in darts.CELL_TYPES}
    arch_opt = torch.optim.Adam(list(alphas.values()), lr=c.arch_learning_rate,
                                betas=(c.arch_b1, c.arch_b2), eps=1e-8,
                                weight_decay=c.arch_weight_decay)
    return model, weight_opt, alphas, arch_opt

  def torch_step(self, model, weight_opt, alphas, arch_opt, step: int, weight_step_logits=None):
    """One search step; returns (validation loss, train loss, accuracy) as tensors.
    The logits' hypergradient is left in their `.grad`. The weight step runs with the
    updated logits, or with `weight_step_logits` where given (the check in 'exact' mode:
    JAX's)."""
    c = self.search_config
    lr = self.lrs[min(step, len(self.lrs) - 1)]
    with torch.no_grad():
      train_targets = self.torch_teacher(self.torch_train)
      val_targets = self.torch_teacher(self.torch_val)
    names = [n for n, _ in model.named_parameters()]
    weights = [p for _, p in model.named_parameters()]
    logits = list(alphas.values())

    def loss(ws, images, targets, a=alphas):
      out = torch.func.functional_call(model, dict(zip(names, ws)), (images, a))
      return tp.distillation(out, targets, self.temperature)

    # The architecture step (cnn/architect.py `_backward_step_unrolled`).
    model.update_batch_stats(False)
    grads = torch.autograd.grad(loss(weights, self.torch_train, train_targets), weights)
    with torch.no_grad():
      unrolled = []
      for name, p, g in zip(names, weights, grads):
        buffer = weight_opt.state.get(p, {}).get('momentum_buffer')
        step_dir = g + (c.weight_decay * p if name in self.decayed else 0.0)
        if buffer is not None:
          step_dir = step_dir + c.momentum * buffer
        unrolled.append((p - lr * step_dir).requires_grad_(True))
    val_loss = loss(unrolled, self.torch_val, val_targets)
    val_grads = torch.autograd.grad(val_loss, logits + unrolled)
    d_logits, d_weights = val_grads[:len(logits)], val_grads[len(logits):]
    with torch.no_grad():
      radius = c.finite_difference_radius / torch.cat([d.flatten() for d in d_weights]).norm()

    def train_logit_grads(sign):
      with torch.no_grad():
        moved = [p + sign * radius * d for p, d in zip(weights, d_weights)]
      return torch.autograd.grad(loss(moved, self.torch_train, train_targets), logits)
    plus, minus = train_logit_grads(1.0), train_logit_grads(-1.0)
    for a, g, gp, gm in zip(logits, d_logits, plus, minus):
      a.grad = g - lr * (gp - gm) / (2 * radius)
    arch_opt.step()
    model.update_batch_stats(True)

    # The weight step with the updated logits.
    if weight_step_logits is None:
      weight_step_logits = {t: a.detach() for t, a in alphas.items()}
    out = model(self.torch_train, weight_step_logits)
    train_loss = tp.distillation(out, train_targets, self.temperature)
    weight_opt.zero_grad(set_to_none=True)
    train_loss.backward()
    tnn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
    for group in weight_opt.param_groups:
      group['lr'] = lr
    weight_opt.step()
    accuracy = (out.argmax(-1) == train_targets.argmax(-1)).float().mean()
    return val_loss.detach(), train_loss.detach(), accuracy

  # --- The row ---

  def check(self):
    """Teacher logits on the resized val batch, then one search step from the same weights
    and logits: the two losses, the logits' hypergradient and update and Adam's moments
    (in 'exact' mode reported only), the update of every weight tensor."""
    result = {'logits': tp.check_teacher_logits(self.teacher, self.teacher_variables,
                                                self.torch_teacher, self.val_images)}
    rstate = steps.replicate(self.state0, self.devices)
    rstate, train_m, arch_m = self.p_step(rstate, *self.r_batches, self.r_teacher)
    train_m = flax.jax_utils.unreplicate(train_m).compute()
    arch_m = flax.jax_utils.unreplicate(arch_m).compute()
    new = jax.device_get(flax.jax_utils.unreplicate(rstate))
    model, weight_opt, alphas, arch_opt = self.torch_state()
    # 'exact': the two sides' logits move apart (another estimator, and Adam's first step
    # is about lr times the gradient's sign); the weight step then runs JAX's on both.
    jax_logits = None if self.mode == 'finite_difference' else {
        t: tp.from_numpy(np.array(new.alphas[t], np.float32)) for t in darts.CELL_TYPES}
    val_loss, train_loss, accuracy = self.torch_step(model, weight_opt, alphas, arch_opt, 0,
                                                     jax_logits)
    jax_terms = {'val_loss': float(arch_m['val_loss']), 'train_loss': float(train_m['loss'])}
    torch_terms = {'val_loss': float(val_loss), 'train_loss': float(train_loss)}
    result['terms'] = {k: (jax_terms[k], torch_terms[k]) for k in jax_terms}
    result['losses'] = [(jax_terms['train_loss'], torch_terms['train_loss'])]
    result['loss'] = tp.check_losses(self.name, 0, jax_terms, torch_terms)
    result['accuracy'] = (float(train_m['accuracy']), float(accuracy))

    # The logits: Adam's first moment is (1 - b1) (hypergradient + decay * logits); the
    # second compared as its square root, on the gradient's scale (Adam divides by it).
    # Where the first moment is rounding, Adam's nearly sign-only first step may go either
    # way on the two sides: those logits are left out of the update's comparison.
    c = self.search_config
    mu = optax.tree_utils.tree_get(new.arch_opt_state, 'mu')
    nu = optax.tree_utils.tree_get(new.arch_opt_state, 'nu')
    mu_scale = max(max(np.abs(np.asarray(mu[t])).max(),
                       np.abs(tp.host(arch_opt.state[alphas[t]]['exp_avg'])).max())
                   for t in darts.CELL_TYPES)
    groups = {'hypergradient': {}, 'logit update': {}, 'sqrt Adam nu': {}}
    result['opposite'] = result['undecided'] = 0
    for t in darts.CELL_TYPES:
      old = np.asarray(self.state0.alphas[t], np.float64)
      state = arch_opt.state[alphas[t]]
      groups['hypergradient'][t] = (
          np.asarray(mu[t], np.float64) / (1 - c.arch_b1) - c.arch_weight_decay * old,
          tp.host(alphas[t].grad).astype(np.float64))
      jax_update = np.asarray(new.alphas[t], np.float64) - old
      torch_update = tp.host(alphas[t]).astype(np.float64) - old
      result['opposite'] += int((np.sign(jax_update) != np.sign(torch_update)).sum())
      sign = tp.decided(mu[t], mu_scale)
      result['undecided'] += int((~sign).sum())
      groups['logit update'][t] = (jax_update[sign], torch_update[sign])
      groups['sqrt Adam nu'][t] = (np.sqrt(np.asarray(nu[t], np.float64)),
                                   np.sqrt(tp.host(state['exp_avg_sq']).astype(np.float64)))
    result['num_logits'] = sum(np.size(self.state0.alphas[t]) for t in darts.CELL_TYPES)
    if self.mode == 'finite_difference':
      result['arch'] = {k: tp.check_updates(self.name, pairs, f'the {{}} cell\'s {k}')
                        for k, pairs in groups.items()}
    else:  # another estimator: how far it is, not a check
      result['arch'] = {}
      for k, pairs in groups.items():
        for t, (a, b) in pairs.items():
          diff, norm = np.linalg.norm(a - b), np.linalg.norm(a)
          result['arch'][f'{t} {k}'] = (float(diff / norm) if norm else float(diff),
                                        float(np.abs(a - b).max(initial=0.0)
                                              / max(np.abs(a).max(initial=0.0), 1e-30)))

    # Every weight tensor, each scanned edge's on its own.
    new_params = self.flat_params(new.weights.params)
    old_params = self.flat_params(self.state0.weights.params)
    torch_params = dict(model.named_parameters())
    originals = dict(self.torch_model.named_parameters())
    pairs = {key: (tp.torch_layout(value) - tp.torch_layout(old_params[key]),
                   tp.host(torch_params[self.torch_name(key)]
                           - originals[self.torch_name(key)]))
             for key, value in new_params.items()}
    result['updates'] = tp.check_updates(self.name, pairs, f'{{}} ({self.mode})',
                                         {k: tp.torch_layout(v) for k, v in old_params.items()})
    return result

  def timers(self):
    """(jax_call(i), torch_call(i)): search steps from the initial state and fresh
    optimizer states on both sides (torch: a copy; `check` still sees the initial one)."""
    state = {'jax': steps.replicate(self.state0, self.devices)}
    torch_state = self.torch_state()

    def jax_call(i):
      state['jax'] = jax.block_until_ready(
          self.p_step(state['jax'], *self.r_batches, self.r_teacher))[0]

    def torch_call(i):
      self.torch_step(*torch_state, i)

    return jax_call, torch_call

  def describe_check(self, r) -> str:
    terms = '; '.join(f'{k} JAX {a:.6f}, torch {b:.6f}' for k, (a, b) in r['terms'].items())
    if self.mode == 'finite_difference':
      arch = 'logits: ' + '; '.join(tp.describe_updates(g, k) for k, g in r['arch'].items())
    else:
      arch = ', '.join(f'{k} {rel:.2e} (max |diff| / max {rel_max:.2e})'
                       for k, (rel, rel_max) in r['arch'].items())
      arch = f'logits, JAX exact vs torch finite difference, rel L2 (not checked): {arch}'
    arch += (f'; {r["opposite"]} of {r["num_logits"]} logits moved in opposite directions, '
             f'{r["undecided"]} with a gradient at rounding level')
    if self.mode == 'exact':
      arch += " (the weight step ran JAX's updated logits on both sides)"
    return (f'{self.mode}: teacher logits (val batch, resized) rel max diff {r["logits"]:.2e} '
            f'(tol {tp.LOGITS_TOL:g}); {terms}; worst rel diff {r["loss"]:.2e} (tol '
            f'{tp.LOSS_RTOL:g}); accuracy JAX {r["accuracy"][0]:.4f}, torch '
            f'{r["accuracy"][1]:.4f}; {arch}; '
            + tp.describe_updates(r['updates'], 'weight updates, each edge its own'))
