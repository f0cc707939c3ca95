"""The project's hot steps against PyTorch implementations of the same work, in one run.

  python benchmarks/compare_torch.py                      # every row; minutes on 2 CPU cores
  python benchmarks/compare_torch.py --steps=synthesis --repeats=10 --json=/tmp/torch.json

Each row is one hot step: the JAX side is the project's own compiled step, the PyTorch side
a module written here for this benchmark that does the same work (same network, loss terms,
optimizer update and batch). Before timing, both sides run on the same inputs and weights
and must agree: the loss values and one updated tensor, within the tolerances below; a
mismatch aborts with the differences. Timed calls then alternate (JAX call, torch call, JAX
call, ...), so load from other processes falls on both alike; a row's time per side is the
median of --repeats calls after --warmup untimed pairs. Both sides run on the CPU: torch
with --threads intra-op threads; XLA:CPU runs on its own thread pool, sized from the host's
cores (JAX has no setting for it), so compare at --threads = the number of cores (default).

Load from other processes hurts torch far more: its OpenMP threads spin at every barrier.
Measured on 2 cores beside a job using ~1.6 of them, the torch synthesis step took 4.5 s at
--threads=2, 0.55 s at 1 thread or with OMP_WAIT_POLICY=PASSIVE, and 0.30 s when that job
was lighter; JAX's took 0.25-0.40 s. So time on an idle machine, or set OMP_WAIT_POLICY=PASSIVE
in the environment; the header prints the load average and that variable.

Rows:
  synthesis      one inversion update as configs/synthesize.py makes it: the shipped
                 cifar10_resnet20, batch 128, canvas 40 / window 32 (a random window and
                 flip per image), every loss term at its default weight, Adam; forward +
                 backward + Adam + clipping on the canvases, full-resolution stage.
  spos_supernet  one SPOS supernet step as configs/spos.py trains it (spos_cifar, batch 32,
                 32 px): the teacher's logits computed in the step, distillation at the
                 config's temperature, SGD as `state_lib.sgd` builds it; the path is an
                 input (`steps.pmap_train_step`, one device). The check runs one fixed
                 path; timing draws a path per (JAX, torch) pair, uniformly among the paths
                 in the config's FLOPs band (the search itself draws by FLOPs bin).
  nb201_supernet the same step on NAS-Bench-201 as configs/spos.py:nb201 trains it
                 (nb201-8x1, batch 64, 32 px, no dropout): the path is the cell
                 architecture, one op per edge shared by every cell; the torch twin is
                 benchmarks/torch_nb201.py. The check runs one fixed cell using every op
                 type; timing draws a cell per pair uniformly among all 5**6.
  proxyless_weight one weight step of the ProxylessNAS search as configs/proxylessnas.py
                 runs it (proxyless_cifar, batch 16, 32 px): a path drawn in the step from
                 the architecture logits, distillation from the teacher computed in the
                 step, Nesterov SGD; the candidates off the path keep weights and momentum.
  proxyless_arch one architecture step of that search: binary gates on two candidates
                 per layer drawn in the step, the task loss times the latency term
                 (mul_log; the latency table measured here as the search measures it,
                 cached in the temp directory), the binary-gate estimator, Adam per layer.
                 Both rows and their torch twin: benchmarks/compare_torch_proxyless.py.
  darts_second_order one step of the DARTS search as configs/darts.py runs it (C=8, 3
                 cells, 16 px, batch 16): the architecture step on a val batch (the
                 hypergradient through a virtual weight step, --darts_mode: exact, the
                 config's, or finite_difference; Adam on the logits), then the weight step on
                 a train batch with the updated logits (distillation from the teacher
                 computed in the step, SGD momentum, clipping). The torch twin runs the
                 reference's finite-difference step; parity holds exactly against JAX's
                 finite_difference, while 'exact' reports how far its hypergradient is.
                 Row and twin: benchmarks/compare_torch_darts.py, benchmarks/torch_darts.py.

Differences that leave the work the same: torch holds images NCHW (converted once, outside
the timed step); while timing it draws its own windows, flips and dropout masks (the check
feeds it JAX's); its BatchNorm keeps the unbiased batch variance in the running statistics
where Flax keeps the biased one (running statistics are not compared).

Imports nothing that imports TensorFlow (the accelerator machines have none), so what lives
in TensorFlow-importing modules is restated here: the optimizer `trainer.fit` builds, and
paths drawn uniformly in the FLOPs band instead of `nas.spos.PathSampler`; the ProxylessNAS
steps in benchmarks/compare_torch_proxyless.py, the DARTS one in compare_torch_darts.py.
"""
import copy
import json
import os
import tempfile
import time

os.environ['JAX_PLATFORMS'] = 'cpu'  # before JAX starts: both sides on the CPU

import compare_torch_darts  # pylint: disable=wrong-import-position  # benchmarks/
import compare_torch_proxyless  # pylint: disable=wrong-import-position  # benchmarks/
import flax.jax_utils  # pylint: disable=wrong-import-position
import flax.linen as nn  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import op_profile  # pylint: disable=wrong-import-position  # benchmarks/
import optax  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position
import torch.nn.functional as F  # pylint: disable=wrong-import-position
import torch_nb201  # pylint: disable=wrong-import-position  # benchmarks/
import torch_parity as tp  # pylint: disable=wrong-import-position  # benchmarks/
from absl import app, flags  # pylint: disable=wrong-import-position
from torch import nn as tnn  # pylint: disable=wrong-import-position

from dfnas_jax import models, teachers  # pylint: disable=wrong-import-position
from dfnas_jax.configs import spos as spos_config  # pylint: disable=wrong-import-position
from dfnas_jax.configs import synthesize as synthesize_config  # pylint: disable=wrong-import-position
from dfnas_jax.models import layers, nb201  # pylint: disable=wrong-import-position
from dfnas_jax.models import spos as spos_lib  # pylint: disable=wrong-import-position
from dfnas_jax.synthesis import inversion  # pylint: disable=wrong-import-position
from dfnas_jax.teachers import convert  # pylint: disable=wrong-import-position
from dfnas_jax.train import state as state_lib  # pylint: disable=wrong-import-position
from dfnas_jax.train import steps as steps_lib  # pylint: disable=wrong-import-position


class TorchChoiceBlock(tnn.Module):
  """models.spos.ChoiceBlock, its convolutions and BatchNorms numbered as in Flax."""

  def __init__(self, cin: int, cout: int, stride: int, choice: int, affine: bool):
    super().__init__()
    kernel = spos_lib.KERNELS[choice] if choice < len(spos_lib.KERNELS) else 3
    self.stride, self.proj, self.main = stride, [], []  # (index, relu) of conv{i} + bn{i}

    def add(ops, c_in, c_out, k=1, s=1, depthwise=False, relu=True):
      i = len(self.proj) + len(self.main)
      setattr(self, f'conv{i}', tnn.Conv2d(c_in, c_out, k, s, (k - 1) // 2, bias=False,
                                           groups=c_in if depthwise else 1))
      setattr(self, f'bn{i}', tnn.BatchNorm2d(c_out, affine=affine))
      ops.append((i, relu))

    if stride == 1:
      proj_channels, main_in = cin - cin // 2, cin // 2  # x[:, 0::2], x[:, 1::2]
    else:
      proj_channels = main_in = cin
      add(self.proj, cin, cin, kernel, stride, depthwise=True, relu=False)
      add(self.proj, cin, cin)
    mid, main_out = cout // 2, cout - proj_channels
    if choice < len(spos_lib.KERNELS):
      add(self.main, main_in, mid)
      add(self.main, mid, mid, kernel, stride, depthwise=True, relu=False)
      add(self.main, mid, main_out)
    else:
      add(self.main, main_in, main_in, 3, stride, depthwise=True, relu=False)
      add(self.main, main_in, mid)
      add(self.main, mid, mid, 3, depthwise=True, relu=False)
      add(self.main, mid, mid)
      add(self.main, mid, mid, 3, depthwise=True, relu=False)
      add(self.main, mid, main_out)

  def _run(self, ops, x):
    for i, relu in ops:
      x = getattr(self, f'bn{i}')(getattr(self, f'conv{i}')(x))
      x = F.relu(x) if relu else x
    return x

  def forward(self, x):
    if self.stride == 1:
      proj, x = x[:, 0::2], x[:, 1::2]
    else:
      proj = self._run(self.proj, x)
    return torch.cat([proj, self._run(self.main, x)], 1)


class TorchChoiceLayer(tnn.Module):

  def __init__(self, cin, cout, stride, affine):
    super().__init__()
    self.choices = tnn.ModuleList([TorchChoiceBlock(cin, cout, stride, c, affine)
                                   for c in range(spos_lib.NUM_CHOICES)])


class TorchSupernet(tnn.Module):
  """models.spos.SPOSNet as a supernet: every choice of every layer, non-affine BatchNorms;
  `forward(images, path)` runs one path (NCHW images in [0, 1])."""

  def __init__(self, space: spos_lib.SearchSpace, num_classes: int, dropout: float):
    super().__init__()
    self.register_buffer('mean', torch.tensor(space.mean).view(1, 3, 1, 1), persistent=False)
    self.register_buffer('std', torch.tensor(space.std).view(1, 3, 1, 1), persistent=False)
    self.stem_conv = tnn.Conv2d(3, space.stem_width, 3, space.stem_stride, 1, bias=False)
    self.stem_bn = tnn.BatchNorm2d(space.stem_width, affine=False)
    for i, (cin, cout, stride, _) in enumerate(space.layers()):
      setattr(self, f'layer{i}', TorchChoiceLayer(cin, cout, stride, affine=False))
    self.last_conv = tnn.Conv2d(space.stage_widths[-1], space.last_width, 1, bias=False)
    self.last_bn = tnn.BatchNorm2d(space.last_width, affine=False)
    self.fc = tnn.Linear(space.last_width, num_classes, bias=False)
    self.dropout = dropout

  def forward(self, images, path, dropout_mask=None):
    x = F.relu(self.stem_bn(self.stem_conv((images - self.mean) / self.std)))
    for i, choice in enumerate(path):
      x = getattr(self, f'layer{i}').choices[choice](x)
    x = F.relu(self.last_bn(self.last_conv(x))).mean((2, 3))
    if dropout_mask is None:
      x = F.dropout(x, self.dropout, self.training)
    else:  # a given mask (the check: JAX's), applied as flax's Dropout does
      x = torch.where(dropout_mask, x / (1.0 - self.dropout), torch.zeros_like(x))
    return self.fc(x)


# --- Row 1: the inversion update -------------------------------------------------------------

def synthesis_lr(s: inversion.Settings, stage_steps: int) -> optax.Schedule:
  """The schedule of `Inverter.optimizer` (the check's second step verifies it)."""
  warmup = min(s.warmup_steps, max(stage_steps - 1, 0))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, s.lr, warmup),
       optax.cosine_decay_schedule(s.lr, max(stage_steps - warmup, 1))], [warmup])


class TorchInversion:
  """The inversion update in PyTorch: the loss terms of `Inverter.loss_terms` (BN statistics
  from forward hooks on every BatchNorm), then Adam, then clipping to the image range."""

  def __init__(self, teacher: tp.TorchCifarResNet, s: inversion.Settings, mean, std, lrs):
    if not s.regional_update:
      raise ValueError('The torch inversion here implements the regional update only.')
    self.teacher = teacher.eval().requires_grad_(False)  # only the canvases get gradients
    self.s, self.weights, self.lrs = s, dict(s.weights), lrs
    self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    self.lo, self.hi = -self.mean / self.std, (1.0 - self.mean) / self.std
    self.stats = []
    if self.weights.get('bn', 0.0):
      for m in teacher.modules():
        if isinstance(m, tnn.BatchNorm2d):
          m.register_forward_hook(self._bn_hook)

  def _bn_hook(self, module, inputs, _):
    x = inputs[0]
    mean = x.mean((0, 2, 3))
    var = (x - mean[None, :, None, None]).square().mean((0, 2, 3))  # biased, as losses.py
    self.stats.append((mean, var, module.running_mean, module.running_var))

  def new_canvas(self, canvas_nhwc):
    canvas = tp.nchw(canvas_nhwc).requires_grad_(True)
    return canvas, torch.optim.Adam([canvas], lr=self.lrs[0], betas=(self.s.beta1, self.s.beta2),
                                    eps=self.s.eps)

  def random_views(self, batch):
    offsets = torch.randint(0, self.s.canvas - self.s.window + 1, (batch, 2))
    flips = torch.rand(batch) < 0.5 if self.s.flip else torch.zeros(batch, dtype=torch.bool)
    return offsets, flips

  def view(self, canvas, offsets, flips):
    """Each image's window at `offsets` (row, column), mirrored left-right where `flips`."""
    size = self.s.window
    rows = offsets[:, :1] + torch.arange(size)
    cols = offsets[:, 1:] + torch.arange(size)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(canvas.shape[0])[:, None, None]
    # Advanced indices around a slice: the result is [batch, rows, cols, channels].
    return canvas[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

  def loss_terms(self, canvas, targets, offsets, flips):
    x = self.view(canvas, offsets, flips)
    self.stats.clear()
    logits = self.teacher(x * self.std + self.mean)
    terms = {'main': (-(targets * F.log_softmax(logits, -1)).sum(-1)).mean()}
    if self.weights.get('bn', 0.0):
      norms = [torch.linalg.norm(rv - v) + torch.linalg.norm(rm - m)
               for m, v, rm, rv in self.stats]
      terms['bn'] = self.s.first_bn_multiplier * norms[0] + sum(norms[1:])
    else:
      terms['bn'] = torch.zeros(())
    diffs = [x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
             x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:]]
    terms['tv_l2'] = sum(torch.linalg.norm(d.flatten()) for d in diffs)
    terms['tv_l1'] = sum(d.abs().mean() for d in diffs)
    terms['l2'] = torch.linalg.norm(x.flatten(1), dim=1).mean()
    total = sum(self.weights.get(k, 0.0) * v for k, v in terms.items())
    return total, terms

  def step(self, canvas, opt, targets, offsets, flips, step: int):
    """One update; returns the loss terms (tensors, not synchronized)."""
    total, terms = self.loss_terms(canvas, targets, offsets, flips)
    opt.zero_grad(set_to_none=True)
    total.backward()
    for group in opt.param_groups:
      group['lr'] = self.lrs[step]
    opt.step()
    with torch.no_grad():
      canvas.clamp_(self.lo, self.hi)
    return {k: v.detach() for k, v in terms.items()}


class SynthesisBench:
  """The JAX inversion update built as benchmarks/synthesis.py builds it, and its torch twin."""
  name = 'synthesis'

  def __init__(self, batch_size: int = 128, config=None):
    config = config or synthesize_config.get_config()
    self.module, self.variables, spec = teachers.load(config.teacher)
    s = self.settings = inversion.settings_from_config(config)
    # The full-resolution stage: two thirds of the default config's steps.
    self.stage_steps = config.full_res_steps if config.multi_resolution else (
        config.low_res_steps + config.full_res_steps)
    self.inverter = inversion.Inverter(self.module.apply, self.variables, self.module.mean,
                                       self.module.std, s, [(1, self.stage_steps)],
                                       chunk_steps=self.stage_steps)
    n = jax.local_device_count()
    if batch_size % n:
      raise ValueError(f'batch_size={batch_size} must divide over {n} devices.')
    self.batch, self.classes = batch_size, spec.num_classes
    self.keys = inversion.image_keys(0, 0, np.arange(batch_size)).reshape(n, -1, 2)
    targets = np.eye(spec.num_classes, dtype=np.float32)[np.arange(batch_size) %
                                                          spec.num_classes]
    self.targets = jnp.asarray(targets.reshape(n, -1, spec.num_classes))
    self.step_fn = self.inverter.chunk_fn(1, 0, self.stage_steps)  # one step, no device loop
    self.config = (f'{spec.name}, batch {batch_size}, canvas {s.canvas}, window {s.window}, '
                   f'full resolution ({self.stage_steps}-step stage), Adam lr {s.lr}')

    self.torch_teacher = tp.TorchCifarResNet(self.module)
    tp.load_flax_variables(self.torch_teacher, self.variables)
    schedule = synthesis_lr(s, self.stage_steps)
    lrs = [float(v) for v in jax.vmap(schedule)(jnp.arange(self.stage_steps + 1))]
    self.torch = TorchInversion(self.torch_teacher, s, self.module.mean, self.module.std, lrs)
    self.torch_targets = torch.from_numpy(targets)

  def _carry(self):
    n = jax.local_device_count()
    canvases = self.inverter.init_canvas_fn(self.keys)
    no_terms = {k: jnp.zeros((n,)) for k in inversion.LOSS_TERMS}
    return (canvases, self.inverter.init_optimizer_fn(self.stage_steps)(canvases), no_terms,
            jnp.full((n,), -1, jnp.int32), no_terms)

  def _jax_step(self, carry, step: int):
    return self.step_fn(carry[0], carry[1], self.targets, self.keys, step,
                        self.inverter.variables, carry[3], carry[4])

  def _host_canvas(self, canvases):
    return np.asarray(canvases).reshape(self.batch, *canvases.shape[2:])

  def check(self, num_steps: int = 2):
    """Teacher logits, then `num_steps` updates from the same canvases with the views the
    JAX step draws (step 0 has learning rate 0: the second moves the canvases)."""
    carry = self._carry()
    canvas0 = self._host_canvas(carry[0])  # a copy: the step donates its input
    s = self.settings
    centre = (s.canvas - s.window) // 2
    pixels = canvas0[:, centre:centre + s.window, centre:centre + s.window]
    result = {'logits': tp.check_teacher_logits(
        self.module, self.variables, self.torch_teacher,
        np.clip(pixels * np.asarray(self.module.std) + np.asarray(self.module.mean), 0, 1))}
    canvas, opt = self.torch.new_canvas(canvas0)
    flat_keys = self.keys.reshape(self.batch, -1)
    losses = []
    for step in range(num_steps):
      offsets, flips = jax.device_get(inversion.sample_views(flat_keys, step, 1, s))
      carry = self._jax_step(carry, step)
      jax_terms = {k: float(v[0]) for k, v in jax.device_get(carry[2]).items()}
      torch_terms = self.torch.step(canvas, opt, self.torch_targets, torch.from_numpy(
          np.array(offsets, np.int64)), torch.from_numpy(np.array(flips)), step)
      torch_terms = {k: float(v) for k, v in torch_terms.items()}
      weights = dict(s.weights)
      for terms in (jax_terms, torch_terms):
        terms['total'] = sum(weights.get(k, 0.0) * terms[k] for k in inversion.LOSS_TERMS)
      result[f'loss_step{step}'] = tp.check_losses(self.name, step, jax_terms, torch_terms)
      losses.append((jax_terms['total'], torch_terms['total']))
    result['update'] = tp.check_update(
        self.name, f'the canvases after {num_steps} steps',
        self._host_canvas(carry[0]).transpose(0, 3, 1, 2) - canvas0.transpose(0, 3, 1, 2),
        canvas.detach().numpy() - canvas0.transpose(0, 3, 1, 2))
    result['losses'] = losses
    return result

  def timers(self):
    """(jax_call(i), torch_call(i)): the i-th timed update on each side, random views."""
    state = {'jax': self._carry()}
    canvas, opt = self.torch.new_canvas(self._host_canvas(state['jax'][0]))

    def jax_call(i):
      state['jax'] = jax.block_until_ready(self._jax_step(state['jax'], i))

    def torch_call(i):
      offsets, flips = self.torch.random_views(self.batch)
      self.torch.step(canvas, opt, self.torch_targets, offsets, flips, min(i, self.stage_steps))

    return jax_call, torch_call

  def describe_check(self, r) -> str:
    losses = '; '.join(f'step {i}: JAX {a:.6f}, torch {b:.6f}'
                       for i, (a, b) in enumerate(r['losses']))
    worst = max(v for k, v in r.items() if k.startswith('loss_step'))
    return (f'teacher logits rel max diff {r["logits"]:.2e} (tol {tp.LOGITS_TOL:g}); '
            f'loss {losses}; '
            f'worst term rel diff {worst:.2e} (tol {tp.LOSS_RTOL:g}); canvas update after '
            f'{len(r["losses"])} steps: rel L2 diff {r["update"][0]:.2e} (tol {tp.UPDATE_RTOL:g}), '
            f'max |diff| / max |update| {r["update"][1]:.2e}')


# --- Row 2: the SPOS supernet step -----------------------------------------------------------

def band_paths(space: spos_lib.SearchSpace, num_classes: int, flops_min: float,
               flops_max: float, rng: np.random.Generator, count: int, max_tries: int = 10000):
  """`count` uniform paths with multiply-adds in [flops_min, flops_max] MFLOPs (<= 0:
  unbounded): `nas.spos.PathSampler`'s 'uniform' mode (that module imports TensorFlow)."""
  paths = []
  for _ in range(max_tries):
    path = tuple(int(c) for c in rng.integers(spos_lib.NUM_CHOICES, size=space.num_layers))
    mflops = spos_lib.cost(space, path, num_classes)[0] / 1e6
    if mflops >= flops_min and (flops_max <= 0 or mflops <= flops_max):
      paths.append(path)
      if len(paths) == count:
        return paths
  raise ValueError(f'Fewer than {count} paths in [{flops_min}, {flops_max}] MFLOPs in '
                   f'{max_tries} draws.')


class SupernetBench:
  """`steps.pmap_train_step` as `nas/spos.py` runs it (via trainer.fit), and its torch twin.

  On the SPOS spaces; a subclass runs another one-shot space through the same machinery
  by overriding `preset` (of configs/spos.py), `search_space`, `draw_paths`, `check_path`
  and `torch_supernet`.
  """
  name = 'spos_supernet'
  preset = ''
  draws_paths = True  # run_row: `timers(count)` draws one path per timed pair

  def search_space(self, space: str):
    """What `draw_paths` and `torch_supernet` need of the space named `space`."""
    if space not in spos_lib.SPACES:
      raise ValueError(f'space={space!r}: this row runs the SPOS spaces {sorted(spos_lib.SPACES)}')
    return spos_lib.SPACES[space]

  def draw_paths(self, count: int, rng: np.random.Generator):
    return band_paths(self.space, self.classes, *self.band, rng, count)

  def check_path(self, seed: int):
    return self.draw_paths(1, np.random.default_rng(seed))[0]

  def torch_supernet(self) -> tnn.Module:
    return TorchSupernet(self.space, self.classes, self.model.dropout)

  def __init__(self, batch_size: int = 0, space: str = '', config=None):
    config = config or spos_config.get_config(self.preset)
    s = self.train_config = config.supernet
    space = space or config.space
    self.space = self.search_space(space)
    if s.warmup_epochs:
      raise ValueError('warmup_epochs > 0 needs the data set size; the benchmark has none.')
    if s.loss != 'distillation' or config.soft_labels != 'teacher':
      raise ValueError('This row times distillation from the teacher computed in the step.')
    self.batch = batch_size or s.batch_size
    self.teacher_module, self.teacher_variables, spec = teachers.load(config.teacher)
    if spec.image_size != s.image_size:
      raise ValueError('The torch teacher here does not resize inputs (teachers.AtInputSize).')
    self.classes, self.temperature = spec.num_classes, s.temperature
    teacher = teachers.AtInputSize(self.teacher_module, spec.image_size)  # retrain.py's
    self.model = models.build_model(space, spec.num_classes, jnp.float32, dropout=config.dropout)
    # trainer.fit's optimizer: warm-up int(warmup_epochs * steps_per_epoch) = 0 steps.
    lr_fn = state_lib.learning_rate_schedule(s.learning_rate, s.num_train_steps, 0,
                                             s.lr_schedule)
    tx = state_lib.sgd(lr_fn, s.momentum, s.weight_decay, s.nesterov, s.grad_clip)
    self.state0 = jax.device_get(state_lib.create_train_state(
        self.model, jax.random.PRNGKey(s.seed), s.image_size, tx))
    self.dropout_rng = jax.random.PRNGKey(s.seed + 1)
    self.p_step = steps_lib.pmap_train_step(
        learning_rate_fn=lr_fn, loss=s.loss, label_smoothing=s.label_smoothing,
        temperature=s.temperature, teacher_apply=teacher.apply, dropout_rng=self.dropout_rng,
        aux_weight=s.get('aux_weight', 0.0), after_update=layers.keep_unused_choices)
    self.devices = jax.local_devices()[:1]
    self.r_teacher = steps_lib.replicate(self.teacher_variables, self.devices)
    rng = np.random.default_rng(s.seed)
    self.images = rng.random((self.batch, s.image_size, s.image_size, 3), np.float32)
    self.r_images = steps_lib.replicate(self.images, self.devices)
    self.band = (config.flops_min, config.flops_max) if space == config.space else (0.0, 0.0)
    self.paths = lambda count, seed: self.draw_paths(count, np.random.default_rng(seed))
    self.parity_path = self.check_path(s.seed)
    self.lrs = [float(v) for v in jax.vmap(lr_fn)(jnp.arange(s.num_train_steps + 1))]
    self.config = (f'{space}, batch {self.batch}, {s.image_size} px, distillation T='
                   f'{s.temperature:g} from {spec.name}, SGD lr {s.learning_rate:g} momentum '
                   f'{s.momentum:g} nesterov={s.nesterov} wd {s.weight_decay:g}, dropout '
                   f'{config.dropout:g}; check path {"".join(map(str, self.parity_path))}')

    self.torch_teacher = tp.TorchCifarResNet(self.teacher_module).eval().requires_grad_(False)
    tp.load_flax_variables(self.torch_teacher, self.teacher_variables)
    self.torch_model = self.torch_supernet().train()
    tp.load_flax_variables(self.torch_model, {'params': self.state0.params,
                                              'batch_stats': self.state0.batch_stats})
    self.torch_images = tp.nchw(self.images)
    self._mask_fn = None

  def _batch(self, path):
    return {'image': self.r_images, 'arch': np.asarray(path, np.int32)[None]}

  def torch_optimizer(self, model):
    s = self.train_config
    named = list(model.named_parameters())
    groups = [{'params': [p for _, p in named if p.ndim > 1], 'weight_decay': s.weight_decay},
              {'params': [p for _, p in named if p.ndim <= 1], 'weight_decay': 0.0}]
    # state_lib.kernels_only: weight decay on kernels only.
    return torch.optim.SGD([g for g in groups if g['params']], lr=self.lrs[0],
                           momentum=s.momentum, nesterov=s.nesterov)

  def torch_step(self, model, opt, path, step: int, dropout_mask=None):
    """One training step of `model` on one path; returns (loss, accuracy) as tensors."""
    with torch.no_grad():
      teacher_logits = self.torch_teacher(self.torch_images)
    logits = model(self.torch_images, path, dropout_mask)
    loss = tp.distillation(logits, teacher_logits, self.temperature)
    opt.zero_grad(set_to_none=True)  # choices off the path get no gradient: SGD skips them
    loss.backward()
    if self.train_config.grad_clip > 0:
      tnn.utils.clip_grad_norm_(model.parameters(), self.train_config.grad_clip)
    for group in opt.param_groups:
      group['lr'] = self.lrs[min(step, len(self.lrs) - 1)]
    opt.step()
    # The JAX step's metrics: accuracy against the teacher's argmax.
    accuracy = (logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
    return loss.detach(), accuracy

  def jax_dropout_mask(self, path, step: int = 0):
    """The dropout mask the JAX train step draws at `step`: one pmap-ed forward with the
    step's rngs, where an interceptor passes ones through flax's Dropout."""
    if self._mask_fn is None:
      def mask_fn(variables, images, arch, step):
        rngs = {'dropout': jax.random.fold_in(jax.random.fold_in(self.dropout_rng, step),
                                              jax.lax.axis_index(steps_lib.AXIS))}
        masks = []

        def interceptor(next_fun, args, kwargs, context):
          if isinstance(context.module, nn.Dropout) and context.method_name == '__call__':
            kept = next_fun(jnp.ones_like(args[0]), *args[1:], **kwargs)
            masks.append(kept != 0)
            return kept * args[0]
          return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
          self.model.apply(variables, images, train=True, rngs=rngs, architecture=arch,
                           mutable=['batch_stats', 'intermediates'])
        return masks[0]
      self._mask_fn = jax.pmap(mask_fn, axis_name=steps_lib.AXIS, in_axes=(0, 0, 0, None))
    variables = steps_lib.replicate({'params': self.state0.params,
                                     'batch_stats': self.state0.batch_stats}, self.devices)
    batch = self._batch(path)
    return np.array(self._mask_fn(variables, batch['image'], batch['arch'], step))[0]

  def check(self):
    """Teacher logits, then one step on `parity_path` from the same weights (and JAX's
    dropout mask): loss, accuracy and the update of every parameter."""
    path = self.parity_path
    result = {'logits': tp.check_teacher_logits(self.teacher_module, self.teacher_variables,
                                                self.torch_teacher, self.images)}
    saved = copy.deepcopy(self.torch_model.state_dict())
    try:
      # Without dropout the model has no Dropout module to take a mask from.
      mask = torch.from_numpy(self.jax_dropout_mask(path)) if self.model.dropout else None
      rstate = steps_lib.replicate(self.state0, self.devices)
      rstate, metrics = self.p_step(rstate, self._batch(path), self.r_teacher)
      m = flax.jax_utils.unreplicate(metrics).compute()
      loss, accuracy = self.torch_step(self.torch_model, self.torch_optimizer(self.torch_model),
                                       path, 0, mask)
      result['losses'] = [(float(m['loss']), float(loss))]
      result['accuracy'] = (float(m['accuracy']), float(accuracy))
      result['loss'] = tp.check_losses(self.name, 0, {'loss': float(m['loss'])},
                                       {'loss': float(loss)})
      new = teachers.flatten_variables(
          {'params': jax.device_get(flax.jax_utils.unreplicate(rstate.params))})
      old = teachers.flatten_variables({'params': self.state0.params})
      torch_params = dict(self.torch_model.named_parameters())
      worst, worst_key, worst_max = (0.0, 0.0), None, 0.0
      for key, value in new.items():  # every parameter: off the path both must stay put
        name = convert.torch_key(tuple(key.split('/')))
        rel = tp.check_update(self.name, f'{key} (path {path})',
                              tp.torch_layout(value) - tp.torch_layout(old[key]),
                              (torch_params[name].detach() - saved[name]).numpy())
        worst_max = max(worst_max, rel[1])
        if rel[0] >= worst[0]:
          worst, worst_key = rel, key
      result['update'], result['update_worst'], result['update_max'] = worst, worst_key, worst_max
    finally:
      self.torch_model.load_state_dict(saved)
    return result

  def timers(self, count: int):
    """(jax_call(i), torch_call(i)) on the same path per i (`count` paths, drawn in the band),
    from the initial weights and fresh optimizer states (torch: a copy; `check` still sees
    the initial weights); and the paths."""
    paths = self.paths(count, self.train_config.seed + 1)
    state = {'jax': steps_lib.replicate(self.state0, self.devices)}
    model = copy.deepcopy(self.torch_model)
    opt = self.torch_optimizer(model)

    def jax_call(i):
      state['jax'], _ = jax.block_until_ready(
          self.p_step(state['jax'], self._batch(paths[i]), self.r_teacher))

    def torch_call(i):
      self.torch_step(model, opt, paths[i], i)

    return jax_call, torch_call, paths

  def describe_check(self, r) -> str:
    (a, b), = r['losses']
    return (f'path {"".join(map(str, self.parity_path))}: teacher logits rel max diff '
            f'{r["logits"]:.2e} (tol {tp.LOGITS_TOL:g}); loss JAX {a:.6f}, torch {b:.6f}, rel diff '
            f'{r["loss"]:.2e} (tol {tp.LOSS_RTOL:g}); accuracy JAX {r["accuracy"][0]:.4f}, torch '
            f'{r["accuracy"][1]:.4f}; parameter updates: worst rel L2 diff {r["update"][0]:.2e} '
            f'at {r["update_worst"]} (tol {tp.UPDATE_RTOL:g}), worst max |diff| / max |update| '
            f'{r["update_max"]:.2e}')


# --- Row 3: the SPOS supernet step on NAS-Bench-201 ------------------------------------------

class NB201SupernetBench(SupernetBench):
  """`SupernetBench` on the NAS-Bench-201 space as configs/spos.py:nb201 trains it: the path
  is the cell architecture (one op per edge, the same in every cell); the torch twin is
  `torch_nb201.TorchNB201Supernet`."""
  name = 'nb201_supernet'
  preset = 'nb201'
  # Every op type: node 1 = 3x3 conv of the input, node 2 = 1x1 conv of the input + skip of
  # node 1, node 3 = avg pool of the input + 1x1 conv of node 1 + none of node 2. Node 2's
  # 1x1 conv is on the path but gets a zero gradient (only 'none' reads node 2): its update
  # is weight decay and momentum alone, on both sides (torch_nb201.TorchZero).
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
    return torch_nb201.TorchNB201Supernet(self.model)


ROWS = {'synthesis': SynthesisBench, 'spos_supernet': SupernetBench,
        'nb201_supernet': NB201SupernetBench,
        'proxyless_weight': compare_torch_proxyless.ProxylessWeightBench,
        'proxyless_arch': compare_torch_proxyless.ProxylessArchBench,
        'darts_second_order': compare_torch_darts.DartsSecondOrderBench}


# --- Timing ----------------------------------------------------------------------------------

def run_row(bench, repeats: int, warmup: int, profile_calls: int = 0, hlo_dir: str = ''):
  """(row dict, parity result, description lines) of one built row (`ROWS[name](...)`):
  the parity check, then timing; then, with `profile_calls`, both sides' profiles of the
  last timed calls (`hlo_dir`: where XLA dumped the optimized HLO, `op_profile.dump_flags`)."""
  name = bench.name
  parity = bench.check()
  lines = [f'{name} parity: {bench.describe_check(parity)}']
  if getattr(bench, 'draws_paths', False):
    jax_call, torch_call, paths = bench.timers(warmup + repeats)
    lines.append(f'{name} timed paths (one per pair, warm-up first): '
                 + ' '.join(''.join(map(str, p)) for p in paths))
  else:
    jax_call, torch_call = bench.timers()
  jax_all, torch_all = tp.interleaved(jax_call, torch_call, repeats, warmup)
  lines.append(f'{name} ms per call, warm-up first: JAX ' + ' '.join(f'{t:.0f}' for t in jax_all)
               + '; torch ' + ' '.join(f'{t:.0f}' for t in torch_all))
  if profile_calls:
    calls = list(range(warmup + repeats))[-profile_calls:]  # paths already compiled and run
    lines.append(op_profile.summary(name, *op_profile.jax_profile(jax_call, calls, hlo_dir),
                                    *op_profile.torch_profile(torch_call, calls)))
  jax_ms, torch_ms = (float(np.median(t[warmup:])) for t in (jax_all, torch_all))
  row = {'step': name, 'config': bench.config, 'jax_ms': jax_ms, 'torch_ms': torch_ms,
         'ratio': torch_ms / jax_ms}
  return row, parity, lines


def markdown(rows) -> str:
  out = ['| step | config | JAX ms | torch ms | torch / JAX |', '|---|---|---|---|---|']
  out += [f'| {r["step"]} | {r["config"]} | {r["jax_ms"]:.1f} | {r["torch_ms"]:.1f} | '
          f'{r["ratio"]:.2f} |' for r in rows]
  return '\n'.join(out)


def main(_):
  unknown = sorted(set(FLAGS.steps) - set(ROWS))
  if unknown:
    raise app.UsageError(f'--steps: unknown rows {unknown}; rows: {sorted(ROWS)}')
  hlo_dir = ''
  if FLAGS.profile:  # before the backend starts: XLA reads its flags once
    hlo_dir = tempfile.mkdtemp(prefix='compare-torch-hlo-')
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' '
                               + op_profile.dump_flags(hlo_dir))
  if jax.default_backend() != 'cpu':
    raise SystemExit(f'JAX runs on {jax.default_backend()}, not the CPU.')
  torch.set_num_threads(FLAGS.threads)
  torch.manual_seed(0)
  start = time.perf_counter()
  print(f'JAX {jax.__version__} on {jax.local_device_count()} CPU device(s), PyTorch '
        f'{torch.__version__}; host cores {len(os.sched_getaffinity(0))}. --threads='
        f'{FLAGS.threads}: torch.set_num_threads({torch.get_num_threads()}); XLA:CPU uses its '
        'own thread pool (sized from the host cores, not by --threads). Load average '
        f'{" ".join(f"{x:.1f}" for x in os.getloadavg())}; OMP_WAIT_POLICY='
        f'{os.environ.get("OMP_WAIT_POLICY", "(unset)")}.')
  print(f'Median of --repeats={FLAGS.repeats} interleaved calls per side after '
        f'--warmup={FLAGS.warmup} pairs; one call = one update (forward + backward + optimizer).')
  overrides = {'synthesis': dict(batch_size=FLAGS.synthesis_batch_size),
               'spos_supernet': dict(batch_size=FLAGS.supernet_batch_size, space=FLAGS.space),
               'nb201_supernet': dict(batch_size=FLAGS.supernet_batch_size),
               'proxyless_weight': dict(batch_size=FLAGS.proxyless_batch_size,
                                        space=FLAGS.proxyless_space),
               'proxyless_arch': dict(batch_size=FLAGS.proxyless_batch_size,
                                      space=FLAGS.proxyless_space,
                                      cost_model=FLAGS.proxyless_cost_model),
               'darts_second_order': dict(batch_size=FLAGS.darts_batch_size,
                                          mode=FLAGS.darts_mode)}
  rows = []
  for name in FLAGS.steps:
    row_start = time.perf_counter()
    try:
      row, _, lines = run_row(ROWS[name](**overrides[name]), FLAGS.repeats, FLAGS.warmup,
                              min(FLAGS.profile, FLAGS.repeats), hlo_dir)
    except tp.ParityError as e:
      raise SystemExit(f'Parity check failed, nothing timed for {name}: {e}') from e
    print('\n'.join(lines))
    print(f'{name}: {time.perf_counter() - row_start:.0f} s (build, compile, check, time); '
          f'load average {os.getloadavg()[0]:.1f}')
    rows.append(row)
  print(markdown(rows))
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(rows, f, indent=2)
    print(f'Wrote {FLAGS.json}')
  print(f'Total {time.perf_counter() - start:.0f} s')


if __name__ == '__main__':
  flags.DEFINE_list('steps', list(ROWS), f'Rows to run, of {list(ROWS)}.')
  flags.DEFINE_integer('repeats', 5, 'Timed calls per side and row (the median is reported).')
  flags.DEFINE_integer('warmup', 2, 'Untimed (JAX, torch) pairs before timing.')
  flags.DEFINE_integer('threads', len(os.sched_getaffinity(0)), 'torch intra-op threads.')
  flags.DEFINE_string('json', None, 'Also write the rows to this JSON file.')
  flags.DEFINE_integer('profile', 0, 'Profile this many of the last timed calls per side and '
                       'print where the time goes (benchmarks/op_profile.py); 0: none.')
  flags.DEFINE_integer('synthesis_batch_size', 128, 'Images per synthesis update.')
  flags.DEFINE_integer('supernet_batch_size', 0,
                       "Supernet rows' batch (0: each config's, 32 SPOS, 64 NB201).")
  flags.DEFINE_string('space', '', "SPOS space of the supernet row ('': the config's).")
  flags.DEFINE_integer('proxyless_batch_size', 0, "ProxylessNAS rows' batch (0: the config's, 16).")
  flags.DEFINE_string('proxyless_space', '', "ProxylessNAS rows' space ('': the config's).")
  flags.DEFINE_string('proxyless_cost_model', '', "proxyless_arch's cost table: latency | flops | "
                      "none ('': the config's, latency).")
  flags.DEFINE_integer('darts_batch_size', 0, "darts_second_order's batch (0: the config's, 16).")
  flags.DEFINE_enum('darts_mode', 'exact', list(compare_torch_darts.MODES),
                    "darts_second_order's hypergradient (the config's: exact).")
  FLAGS = flags.FLAGS
  app.run(main)
