"""compare_torch.py's row `synthesis`: one inversion update as configs/synthesize.py makes
it (the shipped cifar10_resnet20, batch 128, canvas 40 / window 32, a random window and flip
per image, every loss term at its default weight, Adam; forward + backward + Adam + clipping
on the canvases, full-resolution stage), built as benchmarks/synthesis.py builds it, and
`TorchInversion`, the same update in PyTorch.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from torch import nn as tnn

from dfnas_jax import teachers
from dfnas_jax.configs import synthesize as synthesize_config
from dfnas_jax.synthesis import inversion

from . import parity as tp


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
    self.torch_targets = tp.from_numpy(targets)

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
      torch_terms = self.torch.step(canvas, opt, self.torch_targets, tp.from_numpy(
          np.array(offsets, np.int64)), tp.from_numpy(np.array(flips)), step)
      torch_terms = {k: float(v) for k, v in torch_terms.items()}
      weights = dict(s.weights)
      for terms in (jax_terms, torch_terms):
        terms['total'] = sum(weights.get(k, 0.0) * terms[k] for k in inversion.LOSS_TERMS)
      result[f'loss_step{step}'] = tp.check_losses(self.name, step, jax_terms, torch_terms)
      losses.append((jax_terms['total'], torch_terms['total']))
    start = canvas0.transpose(0, 3, 1, 2)
    jax_delta = self._host_canvas(carry[0]).transpose(0, 3, 1, 2) - start
    torch_delta = tp.host(canvas) - start
    result['update'] = tp.check_update(
        self.name, f'the canvases after {num_steps} steps', jax_delta, torch_delta,
        max(np.abs(jax_delta).max(), np.abs(torch_delta).max()), start)
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

