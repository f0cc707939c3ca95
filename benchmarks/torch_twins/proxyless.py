"""The ProxylessNAS search's two steps for compare_torch.py: the rows
`proxyless_weight` and `proxyless_arch`, and the torch twin of the supernet
(`models.proxyless.ProxylessNet`) they run.

  proxyless_weight  one weight step as `python -m dfnas_jax.main --config=configs/proxylessnas.py`
                    runs it (`nas.proxyless.weight_step`): proxyless_cifar, batch 16, 32 px, one
                    path drawn from the architecture logits keyed by (seed, step), the
                    teacher's logits computed in the step, distillation at the config's
                    temperature, Nesterov SGD with weight decay on kernels; the candidates off
                    the path keep their weights and momentum.
  proxyless_arch    one architecture step (`nas.proxyless.arch_step`, binary_mode 'two'): per
                    layer a pair of candidates and the active one of it drawn keyed by
                    (seed + 1, step), the network run on both with one-hot gates (BatchNorm on
                    batch statistics, running ones left alone), the loss times the latency term
                    (mul_log, the table measured here as the search measures it), the gates'
                    gradient turned into logit gradients by the binary-gate estimator, Adam
                    per layer (layers whose active candidate is 'zero' skip it), the pairs'
                    logits shifted back to their old logsumexp.

Both start from the search's initial state (weights, logits N(0, arch_init_std), fresh
optimizer states). The check feeds torch the path, pairs and gates the JAX step draws (the
config's dropout is 0: there are no masks); while timing, call i of both sides runs what
JAX draws at step i from the initial logits (the JAX architecture step draws from its
current logits, which one timed step moves by at most the learning rate).

Differences that leave the work the same: the torch architecture step leaves the weights
out of autograd (JAX differentiates the gates and logits only) and its BatchNorms' running
statistics alone (JAX drops their update); torch skips a 'zero' candidate where JAX adds
zeros; the JAX supernet rematerializes its candidates in the backward pass.

The steps are the search's own (`nas.binary_gates`, which imports no TensorFlow: the
accelerator machines have none).
"""
import copy
import functools
import os
import tempfile
from typing import Tuple

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # before JAX starts: both sides on the CPU

import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from torch import nn as tnn

from dfnas_jax import teachers
from dfnas_jax.configs import proxylessnas as proxyless_config
from dfnas_jax.models import proxyless as space_lib
from dfnas_jax.nas import binary_gates
from dfnas_jax.teachers import convert
from dfnas_jax.train import state as state_lib
from dfnas_jax.train import steps

from . import parity as tp

LATENCY_CACHE = os.path.join(tempfile.gettempdir(), 'dfnas_compare_torch_latency.json')
# Every block's output reaches the loss only through a 1x1 convolution and a training-mode
# BatchNorm (the next searched layer's expansion, or the head's feature mix), which cancel a
# per-channel constant: the gradient of each MBConv's `project_bn` bias is 0 in exact
# arithmetic (float64 updates: ~1e-18), and a weight step's float32 update of it is rounding
# on both sides (<= 2e-7 of the step's largest update at the default config), with no
# relative difference to compare. On the path, it must stay below ROUNDING of the step's
# largest update instead: the rounding of a float32 sum that is 0 in exact arithmetic,
# tp.RESOLUTION (sqrt(n) u for n <= 2^24 terms; it was 1e-5, from one machine).
VANISHING_GRADIENT = 'project_bn/bias'
ROUNDING = tp.RESOLUTION


def search_schedule_steps(config, num_classes: int) -> Tuple[int, int]:
  """(warm-up, search) weight steps of the search on the config's synthetic set:
  num_rounds x images_per_round images less val_per_class per class held out, whole
  batches (`input_pipeline.steps_per_epoch`, one host)."""
  if config.dataset or config.train_split:
    raise ValueError('The benchmark sizes the learning-rate schedule from the synthetic set; '
                     'the config searches on another data set.')
  s = config.synthesis
  per_epoch = (s.images_per_round * s.num_rounds
               - config.val_per_class * num_classes) // config.batch_size
  return config.warmup_epochs * per_epoch, config.num_epochs * per_epoch


@functools.lru_cache(maxsize=2)
def initial_variables(model: space_lib.ProxylessNet, seed: int):
  """`create_train_state`'s initialization with the search's weight rng, made once for
  both rows (compiling the supernet's init takes seconds)."""
  weight_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
  return state_lib.init_variables(model, weight_rng, model.space.image_size)


# --- The torch twin ---------------------------------------------------------------------------

class TorchBatchNorm(tnn.BatchNorm2d):
  """BatchNorm2d (momentum 0.1 is Flax's 0.9); with `update_stats` False, training mode
  normalizes with the batch statistics and leaves the running ones alone, as the
  architecture step does (it drops the BatchNorm updates)."""
  update_stats = True

  def forward(self, x):
    if self.training and not self.update_stats:
      return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
    return super().forward(x)


class TorchMBConv(tnn.Module):
  """models.proxyless.MBConv: [1x1 expand, BN, ReLU6], kxk depthwise, BN, ReLU6, 1x1, BN."""

  def __init__(self, cin: int, cout: int, kernel: int, expansion: int, stride: int,
               eps: float):
    super().__init__()
    mid = cin * expansion
    self.expand = None
    if expansion != 1:
      self.expand = tnn.Conv2d(cin, mid, 1, bias=False)
      self.expand_bn = TorchBatchNorm(mid, eps)
    self.depthwise = tnn.Conv2d(mid, mid, kernel, stride, (kernel - 1) // 2, groups=mid,
                                bias=False)
    self.depthwise_bn = TorchBatchNorm(mid, eps)
    self.project = tnn.Conv2d(mid, cout, 1, bias=False)
    self.project_bn = TorchBatchNorm(cout, eps)

  def forward(self, x):
    if self.expand is not None:
      x = F.relu6(self.expand_bn(self.expand(x)))
    x = F.relu6(self.depthwise_bn(self.depthwise(x)))
    return self.project_bn(self.project(x))


class TorchMixedLayer(tnn.Module):
  """models.proxyless.MixedLayer: the six MBConv candidates (zero has no module)."""

  def __init__(self, layer: space_lib.Layer, eps: float):
    super().__init__()
    self.residual = layer.residual
    self.choices = tnn.ModuleList([
        TorchMBConv(layer.in_channels, layer.out_channels, k, e, layer.stride, eps)
        for k, e in space_lib.MBCONVS])

  def forward(self, x, choice=None, gates=None, paths=None):
    """One path (`choice`), or the sum of gate-weighted candidates: `gates` over `paths`
    (two-path mode) or over every candidate (`paths` None). Zero adds nothing."""
    if gates is None:
      terms = [self.choices[choice](x)] if choice != space_lib.ZERO else []
    else:
      candidates = range(space_lib.NUM_CANDIDATES) if paths is None else paths
      terms = [g * self.choices[c](x) for g, c in zip(gates, candidates)
               if c != space_lib.ZERO]
    if not terms:  # zero: only in shape-keeping layers, whose residual remains
      return x
    y = terms[0] if len(terms) == 1 else sum(terms[1:], terms[0])
    return x + y if self.residual else y


class TorchStem(tnn.Module):
  """models.proxyless.Stem after the normalization: 3x3 convolution, BN, ReLU6, the fixed
  MBConv (expansion 1)."""

  def __init__(self, space: space_lib.SearchSpace, eps: float):
    super().__init__()
    self.conv = tnn.Conv2d(3, space.stem_width, 3, space.stem_stride, 1, bias=False)
    self.bn = TorchBatchNorm(space.stem_width, eps)
    self.first_block = TorchMBConv(space.stem_width, space.first_width, 3, 1, 1, eps)

  def forward(self, x):
    return self.first_block(F.relu6(self.bn(self.conv(x))))


class TorchHead(tnn.Module):
  """models.proxyless.Head without dropout (the search's is 0)."""

  def __init__(self, cin: int, last_width: int, num_classes: int, eps: float):
    super().__init__()
    self.feature_mix = tnn.Conv2d(cin, last_width, 1, bias=False)
    self.feature_mix_bn = TorchBatchNorm(last_width, eps)
    self.classifier = tnn.Linear(last_width, num_classes)

  def forward(self, x):
    return self.classifier(F.relu6(self.feature_mix_bn(self.feature_mix(x))).mean((2, 3)))


class TorchProxylessNet(tnn.Module):
  """models.proxyless.ProxylessNet as a supernet (NCHW images in [0, 1]): `forward(images,
  path=...)` runs one path, `forward(images, gates=..., paths=...)` gated candidates."""

  def __init__(self, space: space_lib.SearchSpace, num_classes: int, eps: float):
    super().__init__()
    self.register_buffer('mean', torch.tensor(space.mean).view(1, 3, 1, 1), persistent=False)
    self.register_buffer('std', torch.tensor(space.std).view(1, 3, 1, 1), persistent=False)
    self.stem = TorchStem(space, eps)
    self.num_layers = space.num_layers
    for i, layer in enumerate(space.layers()):
      setattr(self, f'layer{i}', TorchMixedLayer(layer, eps))
    self.head = TorchHead(space.stage_widths[-1], space.last_width, num_classes, eps)

  def forward(self, images, path=None, gates=None, paths=None):
    x = self.stem((images - self.mean) / self.std)
    for i in range(self.num_layers):
      layer = getattr(self, f'layer{i}')
      if gates is None:
        x = layer(x, choice=path[i])
      else:
        x = layer(x, gates=gates[i], paths=None if paths is None else paths[i])
    return self.head(x)


def digits(choices) -> str:
  return ''.join(str(int(c)) for c in choices)


# --- The rows ---------------------------------------------------------------------------------

class _ProxylessBench:
  """What both rows build as `nas.proxyless.search` does: the supernet, the initial search
  state, the teacher; and their torch twins."""

  def __init__(self, batch_size: int = 0, space: str = '', config=None):
    config = config or proxyless_config.get_config()
    space = space or config.space
    if space not in space_lib.SPACES:
      raise ValueError(f'space={space!r}: the ProxylessNAS spaces are '
                       f'{sorted(space_lib.SPACES)}')
    if config.loss != 'distillation' or config.soft_labels != 'teacher':
      raise ValueError('These rows time distillation from the teacher computed in the step.')
    if config.dropout:  # binary_gates.arch_step applies the network without a dropout rng
      raise ValueError('The ProxylessNAS search runs with dropout 0 only.')
    if config.compute_dtype != 'float32':
      raise ValueError('The torch twin computes in float32.')
    if config.binary_mode not in ('two', 'full'):
      raise ValueError(f'binary_mode={config.binary_mode!r}')
    self.search_config, self.space_name = config, space
    self.space = space_lib.SPACES[space]
    self.allowed = self.space.allowed()
    self.batch = batch_size or config.batch_size
    self.teacher_module, self.teacher_variables, spec = teachers.load(
        config.teacher, config.teacher_checkpoint or None)
    if spec.image_size != self.space.image_size:
      raise ValueError('The torch teacher here does not resize inputs (teachers.AtInputSize).')
    self.classes, self.temperature = spec.num_classes, config.temperature
    self.teacher = teachers.AtInputSize(self.teacher_module, spec.image_size)
    self.model = space_lib.ProxylessNet(self.space, spec.num_classes, dropout=config.dropout,
                                        dtype=jnp.float32, bn_epsilon=config.bn_epsilon)
    warmup_steps, search_steps = search_schedule_steps(config, spec.num_classes)
    self.lr_fn = binary_gates.weight_schedule(config, warmup_steps, search_steps)
    self.num_steps = warmup_steps + search_steps
    self.arch_tx = binary_gates.arch_optimizer(config)
    weight_rng, alpha_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    alphas = config.arch_init_std * jax.random.normal(alpha_rng, self.allowed.shape)
    self.state0 = jax.device_get(state_lib.SearchState(
        weights=state_lib.create_train_state(
            self.model, weight_rng, self.space.image_size,
            binary_gates.weight_optimizer(config, self.lr_fn),
            initial_variables(self.model, config.seed)),
        alphas=alphas, arch_opt_state=self.arch_tx.init(alphas)))
    self.devices = jax.local_devices()[:1]
    self.r_teacher = steps.replicate(self.teacher_variables, self.devices)
    size = self.space.image_size
    self.images = np.random.default_rng(config.seed).random((self.batch, size, size, 3),
                                                            np.float32)
    self.r_batch = {'image': steps.replicate(self.images, self.devices)}
    self.torch_images = tp.nchw(self.images)
    self.torch_teacher = tp.TorchCifarResNet(self.teacher_module).eval().requires_grad_(False)
    tp.load_flax_variables(self.torch_teacher, self.teacher_variables)
    self.torch_model = TorchProxylessNet(self.space, spec.num_classes, config.bn_epsilon).train()
    tp.load_flax_variables(self.torch_model, {'params': self.state0.weights.params,
                                              'batch_stats': self.state0.weights.batch_stats})
    self.teacher_name = spec.name

  def teacher_logits(self):
    with torch.no_grad():
      return self.torch_teacher(self.torch_images)


class ProxylessWeightBench(_ProxylessBench):
  """`nas.proxyless.weight_step` as the search pmaps it, and its torch twin."""
  name = 'proxyless_weight'
  draws_paths = True  # run_row: `timers(count)` returns what each timed pair runs

  def __init__(self, batch_size: int = 0, space: str = '', config=None):
    super().__init__(batch_size, space, config)
    c = self.search_config
    self.p_step = binary_gates.pmap_weight_step(c, self.allowed, self.lr_fn, self.teacher.apply)
    self._sample = jax.jit(lambda step: binary_gates.sample_path(
        jax.random.fold_in(jax.random.PRNGKey(c.seed), step), self.state0.alphas, self.allowed))
    self.lrs = np.asarray(jax.vmap(self.lr_fn)(jnp.arange(self.num_steps + 1))).tolist()
    self.parity_path = self.path(0)
    self.config = (f'{self.space_name}, batch {self.batch}, {self.space.image_size} px, '
                   f'distillation T={c.temperature:g} from {self.teacher_name}, SGD lr '
                   f'{self.lrs[0]:g} momentum {c.momentum:g} nesterov={c.nesterov} wd '
                   f'{c.weight_decay:g} ({"all weights" if c.decay_all_weights else "kernels"}); '
                   f'one path drawn from the logits per step; check path '
                   f'{digits(self.parity_path)}')

  def path(self, step: int) -> Tuple[int, ...]:
    """The path the JAX step draws at `step` (the weight steps leave the logits alone)."""
    return tuple(int(c) for c in np.asarray(self._sample(step)))

  def torch_optimizer(self, model):
    c = self.search_config
    named = list(model.named_parameters())
    decayed = lambda p: c.decay_all_weights or p.ndim > 1  # state_lib.kernels_only
    groups = [{'params': [p for _, p in named if decayed(p)], 'weight_decay': c.weight_decay},
              {'params': [p for _, p in named if not decayed(p)], 'weight_decay': 0.0}]
    return torch.optim.SGD([g for g in groups if g['params']], lr=self.lrs[0],
                           momentum=c.momentum, nesterov=c.nesterov)

  def torch_step(self, model, opt, path, step: int):
    """One weight step of `model` on `path`; returns (loss, accuracy) as tensors."""
    teacher_logits = self.teacher_logits()
    logits = model(self.torch_images, path=path)
    loss = tp.distillation(logits, teacher_logits, self.temperature)
    opt.zero_grad(set_to_none=True)  # candidates off the path get no gradient: SGD skips them
    loss.backward()
    for group in opt.param_groups:
      group['lr'] = self.lrs[min(step, len(self.lrs) - 1)]
    opt.step()
    accuracy = (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
    return loss.detach(), accuracy

  def check(self):
    """Teacher logits, then one step on the path JAX draws at step 0 from the same weights:
    loss, accuracy and the update of every parameter (off the path: none on both sides).

    At the default config the worst tensors are BatchNorm biases (6.8e-3 on layer 2's
    depthwise_bn): JAX's float32 update is that far from float64 (both sides), torch's
    float32 6.5e-6; JAX and torch in float64 agree within 2.3e-6 on every tensor.
    """
    path = self.parity_path
    result = {'logits': tp.check_teacher_logits(self.teacher_module, self.teacher_variables,
                                                self.torch_teacher, self.images)}
    saved = copy.deepcopy(self.torch_model.state_dict())
    try:
      rstate = steps.replicate(self.state0, self.devices)
      rstate, metrics_ = self.p_step(rstate, self.r_batch, self.r_teacher)
      m = flax.jax_utils.unreplicate(metrics_).compute()
      loss, accuracy = self.torch_step(self.torch_model, self.torch_optimizer(self.torch_model),
                                       path, 0)
      result['losses'] = [(float(m['loss']), float(loss))]
      result['accuracy'] = (float(m['accuracy']), float(accuracy))
      result['loss'] = tp.check_losses(self.name, 0, {'loss': float(m['loss'])},
                                       {'loss': float(loss)})
      new = teachers.flatten_variables(
          {'params': jax.device_get(flax.jax_utils.unreplicate(rstate.weights.params))})
      old = teachers.flatten_variables({'params': self.state0.weights.params})
      torch_params = dict(self.torch_model.named_parameters())
      pairs, still, rounding = {}, 0, {}
      for key, value in new.items():  # every parameter: off the path both must stay put
        name = convert.torch_key(tuple(key.split('/')))
        jax_delta = tp.torch_layout(value) - tp.torch_layout(old[key])
        torch_delta = tp.host(torch_params[name] - saved[name])
        still += not jax_delta.any()
        if key.endswith(VANISHING_GRADIENT) and jax_delta.any():
          rounding[key] = max(np.abs(jax_delta).max(), np.abs(torch_delta).max())
        else:
          pairs[key] = (jax_delta, torch_delta)
      summary = tp.check_updates(self.name, pairs, f'{{}} (path {digits(path)})',
                                 {k: tp.torch_layout(v) for k, v in old.items()})
      rounding = {k: float(v / summary['scale']) for k, v in rounding.items()}
      for key, ratio in rounding.items():
        if not ratio <= ROUNDING:
          raise tp.ParityError(
              f'{self.name}: {key}, whose gradient vanishes in exact arithmetic, moved by '
              f'{ratio:.3g} of the largest update (JAX or torch) > {ROUNDING:g}.')
      result.update(updates=summary, unchanged=still, tensors=len(new),
                    rounding=max(rounding.values(), default=0.0), rounding_tensors=len(rounding))
    finally:
      self.torch_model.load_state_dict(saved)
    return result

  def timers(self, count: int):
    """(jax_call(i), torch_call(i)) on the path JAX draws at step i, from the initial weights
    and fresh optimizer states (torch: a copy; `check` still sees the initial weights);
    and the paths."""
    return tp.path_timers(self, [self.path(i) for i in range(count)],
                          lambda i: self.r_batch)

  def describe_check(self, r) -> str:
    (a, b), = r['losses']
    return (f'path {digits(self.parity_path)}: teacher logits rel max diff {r["logits"]:.2e} '
            f'(tol {tp.LOGITS_TOL:g}); loss JAX {a:.6f}, torch {b:.6f}, rel diff {r["loss"]:.2e} '
            f'(tol {tp.LOSS_RTOL:g}); accuracy JAX {r["accuracy"][0]:.4f}, torch '
            f'{r["accuracy"][1]:.4f}; {tp.describe_updates(r["updates"], "parameter updates")}; '
            f'{r["unchanged"]} of {r["tensors"]} tensors (off the path) '
            f'unchanged on both sides; the {r["rounding_tensors"]} {VANISHING_GRADIENT} on the '
            f'path (gradient 0 in exact arithmetic) moved by <= {r["rounding"]:.1e} of the largest '
            f'update (tol {ROUNDING:g})')


class ProxylessArchBench(_ProxylessBench):
  """`nas.proxyless.arch_step` as the search pmaps it, and its torch twin."""
  name = 'proxyless_arch'
  draws_paths = True

  def __init__(self, batch_size: int = 0, space: str = '', config=None, cost_model: str = '',
               latency_cache: str = ''):
    if cost_model:
      config = copy.deepcopy(config or proxyless_config.get_config())
      config.cost_model = cost_model
    super().__init__(batch_size, space, config)
    c = self.search_config
    # A strong int32 step: the timed calls set it (a weak one would compile the step twice).
    self.state0 = self.state0.replace(weights=self.state0.weights.replace(step=np.int32(0)))
    self.mode = c.binary_mode
    c.latency_cache = latency_cache or c.latency_cache or LATENCY_CACHE  # no work directory
    self.cost, self.cost_loss = binary_gates.cost_setup(c, self.space, self.classes, workdir='')
    self.p_step = binary_gates.pmap_arch_step(c, self.allowed, self.arch_tx, self.cost,
                                              self.cost_loss, self.teacher.apply)
    self._binarize = jax.jit(lambda step: binary_gates.binarize(
        jax.random.fold_in(jax.random.PRNGKey(c.seed + 1), step), self.state0.alphas,
        self.allowed, self.mode))
    self.torch_model.requires_grad_(False)  # the step differentiates the gates and logits only
    for m in self.torch_model.modules():
      if isinstance(m, TorchBatchNorm):
        m.update_stats = False
    self.table = tp.from_numpy(np.asarray(self.cost.table, np.float32))
    self.torch_allowed = tp.from_numpy(self.allowed)
    self.parity_draw = self.draw(0)
    form = self.cost_loss.form or 'no cost term'
    self.config = (f'{self.space_name}, batch {self.batch}, {self.space.image_size} px, '
                   f'binary gates ({self.mode}), distillation T={c.temperature:g} from '
                   f'{self.teacher_name}, {form} on {self.cost.kind} ({self.cost.unit}, target '
                   f'{self.cost_loss.target:.3g}), Adam per layer lr {c.arch_learning_rate:g} '
                   f'betas ({c.arch_b1:g}, {c.arch_b2:g}); check draw '
                   f'{self.describe_draw(self.parity_draw)}')

  def draw(self, step: int):
    """(paths [L, 2] or None, one-hot gates) the JAX step draws at `step` from the initial
    logits, as nested lists."""
    paths, gates = jax.device_get(self._binarize(step))
    return None if paths is None else paths.tolist(), gates.tolist()

  def describe_draw(self, draw) -> str:
    """Active candidates per layer, then the other of each pair ('two' mode)."""
    paths, gates = draw
    active = [int(np.argmax(g)) for g in gates]
    if paths is None:
      return digits(active)
    return (digits(p[a] for p, a in zip(paths, active)) + '/'
            + digits(p[1 - a] for p, a in zip(paths, active)))

  def torch_alphas(self):
    """One parameter per layer, as the reference's per-layer logits."""
    return [tnn.Parameter(tp.from_numpy(np.array(row, np.float32)))
            for row in np.asarray(self.state0.alphas)]

  def torch_optimizer(self, alphas):
    c = self.search_config
    return torch.optim.Adam(alphas, lr=c.arch_learning_rate, betas=(c.arch_b1, c.arch_b2),
                            eps=1e-8, weight_decay=c.arch_weight_decay)

  def cost_term(self, task, expected):
    """`binary_gates.CostLoss` on tensors."""
    form, c = self.cost_loss.form, self.cost_loss
    if form is None:
      return task
    if form == 'mul_log':
      return c.alpha * task * (torch.log(expected) / float(np.log(c.target))) ** c.beta
    return task + c.lam * (expected - c.target) / c.target

  def torch_step(self, alphas, opt, draw):
    """One architecture step with the gates `draw`; returns (total, task, E[cost])."""
    paths, gate_list = draw
    teacher_logits = self.teacher_logits()
    gates = torch.tensor(gate_list, dtype=torch.float32, requires_grad=True)
    a = torch.stack(list(alphas))
    logits = self.torch_model(self.torch_images, gates=gates, paths=paths)
    task = tp.distillation(logits, teacher_logits, self.temperature)
    if paths is None:
      probs = F.softmax(a.masked_fill(~self.torch_allowed, -float('inf')), -1)
    else:
      index = torch.tensor(paths)
      probs = torch.zeros_like(a).scatter(1, index, F.softmax(a.gather(1, index), -1))
    expected = self.cost.fixed + (probs * self.table).sum()
    total = self.cost_term(task, expected)
    opt.zero_grad(set_to_none=True)
    total.backward()  # the gates' gradient and E[cost]'s own gradient in the logits
    with torch.no_grad():
      g = gates.grad
      if paths is None:  # dL/dalpha_i = p_i (dL/dg_i - sum_j p_j dL/dg_j)
        p = probs.detach()
        estimate = p * (g - (p * g).sum(-1, keepdim=True))
      else:  # over the pair, its probabilities renormalized between them
        p = F.softmax(a.detach().gather(1, index), -1)
        estimate = torch.zeros_like(a).scatter(1, index, p * (g - (p * g).sum(-1, keepdim=True)))
      old = a.detach().clone()
      for i, alpha in enumerate(alphas):
        if paths is not None and paths[i][int(np.argmax(gate_list[i]))] == space_lib.ZERO:
          alpha.grad = None  # active zero: no gradient at all, Adam skips the layer
        else:
          alpha.grad = estimate[i] if alpha.grad is None else alpha.grad + estimate[i]
      opt.step()
      if paths is not None:  # the pairs back to their old logsumexp
        new = torch.stack(list(alphas))
        shift = new.gather(1, index).logsumexp(-1) - old.gather(1, index).logsumexp(-1)
        for i, alpha in enumerate(alphas):
          alpha.index_add_(0, index[i], -shift[i].expand(2))
    return total.detach(), task.detach(), expected.detach()

  def check(self):
    """Teacher logits, then one architecture step with the gates JAX draws at step 0 from the
    same weights and logits: the three losses, every layer's logit update (those JAX keeps
    put, exactly put), and Adam's moments (its first is the logit gradient times 1 - b1)."""
    draw = self.parity_draw
    result = {'logits': tp.check_teacher_logits(self.teacher_module, self.teacher_variables,
                                                self.torch_teacher, self.images)}
    rstate = steps.replicate(self.state0, self.devices)
    rstate, metrics_ = self.p_step(rstate, self.r_batch, self.r_teacher)
    m = flax.jax_utils.unreplicate(metrics_).compute()
    new_state = jax.device_get(flax.jax_utils.unreplicate(rstate))
    alphas = self.torch_alphas()
    opt = self.torch_optimizer(alphas)
    total, task, expected = self.torch_step(alphas, opt, draw)
    jax_terms = {'arch_loss': float(m['arch_loss']), 'val_loss': float(m['val_loss']),
                 'expected_cost': float(m['expected_cost'])}
    torch_terms = {'arch_loss': float(total), 'val_loss': float(task),
                   'expected_cost': float(expected)}
    result['terms'] = {k: (jax_terms[k], torch_terms[k]) for k in jax_terms}
    result['losses'] = [(jax_terms['arch_loss'], torch_terms['arch_loss'])]
    result['loss'] = tp.check_losses(self.name, 0, jax_terms, torch_terms)
    old = np.asarray(self.state0.alphas, np.float64)
    jax_delta = np.asarray(new_state.alphas, np.float64) - old
    torch_delta = tp.host(torch.stack(alphas)).astype(np.float64) - old
    moments = {k: np.asarray(optax.tree_utils.tree_get(new_state.arch_opt_state, k))
               for k in ('mu', 'nu', 'count')}
    # Per layer; each kind one group (tp.check_updates). Adam's second moment as its square
    # root, on the gradient's scale (Adam divides by it). The first moment is the gradient
    # times 1 - b1; where it is rounding, Adam's nearly sign-only first step may go either
    # way on the two sides: those logits are left out of the update's comparison.
    groups = {'update': {}, 'mu': {}, 'sqrt nu': {}}
    skipped, put, undecided = [], 0, 0
    mu_scale = max(np.abs(moments['mu']).max(), max(
        np.abs(tp.host(opt.state[a]['exp_avg'])).max() for a in alphas if a in opt.state))
    for i, alpha in enumerate(alphas):
      state = opt.state.get(alpha, {})
      if 'step' not in state:
        skipped.append(i)
      torch_count = int(state['step']) if 'step' in state else 0
      if torch_count != int(moments['count'][i]):
        raise tp.ParityError(f'{self.name}: layer {i}: Adam took {int(moments["count"][i])} '
                             f'steps in JAX, {torch_count} in torch.')
      kept = jax_delta[i] == 0  # where JAX keeps a logit put, torch must keep it exactly
      put += int(kept.sum())
      if torch_delta[i][kept].any():
        raise tp.ParityError(f'{self.name}: layer {i}: torch moved logits that JAX keeps put '
                             f'(by up to {np.abs(torch_delta[i][kept]).max():.3g}).')
      sign = tp.decided(moments['mu'][i], mu_scale)
      undecided += int((~sign & ~kept).sum())
      groups['update'][i] = (jax_delta[i][sign], torch_delta[i][sign])
      for k, name in (('mu', 'exp_avg'), ('sqrt nu', 'exp_avg_sq')):
        a = moments[k.split()[-1]][i]
        b = tp.host(state[name]) if name in state else np.zeros_like(a)
        groups[k][i] = (np.sqrt(a), np.sqrt(b)) if k == 'sqrt nu' else (a, b)
    where = f'{{}} (draw {self.describe_draw(draw)})'
    result['groups'] = {k: tp.check_updates(self.name, pairs, f'{k} of layer {where}')
                        for k, pairs in groups.items()}
    result.update(skipped=skipped, put=put, total=jax_delta.size, undecided=undecided)
    return result

  def timers(self, count: int):
    """(jax_call(i), torch_call(i)): architecture steps from the initial logits and fresh
    Adam states (torch: fresh logits; `check` still sees the initial ones), the JAX state's
    step set to i so that its draw is the one of step i; torch runs that draw (from the
    initial logits). And the draws."""
    draws = [self.draw(i) for i in range(count)]
    state = {'jax': steps.replicate(self.state0, self.devices)}
    alphas = self.torch_alphas()
    opt = self.torch_optimizer(alphas)

    def jax_call(i):
      s = state['jax']
      # A new step array per call: the step donates it (a profile repeats an index).
      s = s.replace(weights=s.weights.replace(step=steps.replicate(np.int32(i), self.devices)))
      state['jax'], _ = jax.block_until_ready(self.p_step(s, self.r_batch, self.r_teacher))

    def torch_call(i):
      self.torch_step(alphas, opt, draws[i])

    return jax_call, torch_call, [self.describe_draw(d) for d in draws]

  def describe_check(self, r) -> str:
    terms = '; '.join(f'{k} JAX {a:.6f}, torch {b:.6f}' for k, (a, b) in r['terms'].items())
    groups = '; '.join(tp.describe_updates(g, f"{k} per layer") for k, g in r['groups'].items())
    kind = 'active/other' if self.mode == 'two' else 'active'
    return (f'draw {self.describe_draw(self.parity_draw)} ({kind}): teacher logits rel '
            f'max diff {r["logits"]:.2e} (tol {tp.LOGITS_TOL:g}); {terms}; worst rel diff '
            f'{r["loss"]:.2e} (tol {tp.LOSS_RTOL:g}); logit updates and Adam\'s moments: '
            f'{groups}; layers skipped (active zero): {r["skipped"]}; {r["put"]} of '
            f'{r["total"]} logits kept put on both sides, {r["undecided"]} others with a '
            'gradient at rounding level not compared')
