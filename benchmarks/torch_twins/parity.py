"""What every row of benchmarks/compare_torch.py shares: the parity tolerances and checks,
Flax variables loaded into torch modules, the torch twin of the CIFAR ResNet teachers, and
the interleaved timing. Imports nothing that imports TensorFlow.

The torch device follows JAX's backend: compare_torch.py sets torch's default device to
CUDA when JAX runs on a GPU; `from_numpy` and `host` move arrays to and from it.
"""
import copy
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # before JAX starts: both sides on the CPU

import time
from typing import Dict, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn as tnn

from dfnas_jax import teachers
from dfnas_jax.models import resnet
from dfnas_jax.teachers import convert
from dfnas_jax.train import steps

# Parity tolerances, float32 on both sides, each from the arithmetic of float32 on any
# IEEE-754 processor (unit roundoff u = 2^-24 = 6.0e-8): another CPU changes the order of
# the sums (vector width, threads, fused multiply-adds), not u.
EPS32 = 2.0**-24
# Logits: each pre-activation of the teacher is a float32 dot product of n <= 3*3*64 = 576
# terms, which two summation orders put about sqrt(n) u = 1.4e-6 apart (relative to the sum
# of the terms' magnitudes); BatchNorm keeps every layer's output at unit scale, so the 20
# layers' errors add: <= 20 * 1.4e-6 = 2.9e-5 even if they never cancel. 1e-4 leaves 3x on
# that (observed: <= 4e-7); a wrong weight, layout or op moves the logits by >= 1e-2.
LOGITS_TOL = 1e-4  # max |logit difference| / max(1, max |logit|)
# Losses: cross entropies and norms of the same activations, conditioned as the logits
# (|d loss| <= 2 max |d logit| for a cross entropy): the same 1e-4, relative to the term.
LOSS_RTOL = 1e-4   # |loss difference| / |loss|, the total and every term
# Updates, compared per tensor in L2 (not elementwise: a ReLU input within rounding of 0
# can fall on opposite sides, changing a patch of one image's gradient; synthesis at batch
# 128: L2 1.3e-4). A gradient cancelled by what follows it (a kernel before a training-mode
# BatchNorm, which removes its output's per-channel mean and scale) is a small difference of
# large terms: its float32 error is u times that cancellation, a property of the network,
# not of the processor. The worst measured against float64 is 6.8e-3 (proxyless_weight,
# depthwise_bn/bias; spos_supernet 5e-3); two float32 sides are at most the sum of their
# errors, 2 * 6.8e-3 = 1.4e-2 < 2e-2. A real difference (a wrong window or flip for one
# image of 128, learning rate, beta, loss weight) is >= ~1e-1.
UPDATE_RTOL = 2e-2  # ||update difference|| / ||update||, per compared tensor
# ...unless the update is itself at rounding level. A float32 sum of n terms is off by
# about sqrt(n) u times the sum of their magnitudes, whatever the sum comes to: a tensor
# whose exact gradient is (nearly) 0 gets an update that is rounding of terms as large as
# its group's largest update (the group: every tensor that one step updates from one loss,
# or every layer's logits or optimizer moments). With n up to 2^24 terms (the longest sums
# here, batch x pixels x channels, are < 2^23), sqrt(n) u = 2^-12 = 2.4e-4 of the group's
# largest |update| per element. proxyless_arch at the default config on an AMD EPYC: layer
# 1's Adam second moment (max 4.3e-11, a gradient of 2e-4) differed by 2.5% in L2, 1.1e-12.
RESOLUTION = 2.0**-12  # per element, of the group's largest |update|

class ParityError(AssertionError):
  """The two implementations do not compute the same thing."""


def rel_diff(a: float, b: float) -> float:
  return abs(a - b) / max(abs(a), 1e-12)


# --- Flax variables -> torch modules ---------------------------------------------------------

def torch_layout(x) -> np.ndarray:
  """Flax HWIO convolution / [in, out] dense kernels -> torch OIHW / [out, in]."""
  x = np.array(x, np.float32)  # a writable copy (torch.from_numpy warns on read-only)
  return np.ascontiguousarray(x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T if x.ndim == 2
                              else x)


def load_flax_variables(module: tnn.Module, variables) -> None:
  """Copies Flax {'params', 'batch_stats'} into `module`, which they must cover exactly."""
  state = module.state_dict()
  expected = {k for k in state if not k.endswith('num_batches_tracked')}
  problems, done = [], set()
  for key, value in teachers.flatten_variables(variables).items():
    name, value = convert.torch_key(tuple(key.split('/'))), torch_layout(value)
    if name not in state:
      problems.append(f'{key} -> {name}: no such torch tensor')
    elif tuple(state[name].shape) != value.shape:
      problems.append(f'{key} -> {name}: shape {value.shape}, torch {tuple(state[name].shape)}')
    else:
      with torch.no_grad():
        state[name].copy_(torch.from_numpy(value))  # to its device
      done.add(name)
  problems += [f'{name}: not set from the Flax variables' for name in sorted(expected - done)]
  if problems:
    raise ValueError('Flax variables do not fit the torch module:\n  ' + '\n  '.join(problems))


# --- PyTorch modules -------------------------------------------------------------------------

class TorchBasicBlock(tnn.Module):
  """models.resnet.BasicBlock."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(cout)
    self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                       tnn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    # The shortcut after the main branch, as in Flax: BatchNorms run in the same order.
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchCifarResNet(tnn.Module):
  """A Flax CIFAR ResNet (`models.resnet.ResNet`, stem 'cifar'): NCHW images in [0, 1]."""

  def __init__(self, module: resnet.ResNet):
    super().__init__()
    if module.stem != 'cifar' or module.block is not resnet.BasicBlock:
      raise ValueError(f'Only CIFAR-stem BasicBlock ResNets have a torch twin here, got {module}')
    self.register_buffer('mean', torch.tensor(module.mean).view(1, 3, 1, 1), persistent=False)
    self.register_buffer('std', torch.tensor(module.std).view(1, 3, 1, 1), persistent=False)
    self.conv1 = tnn.Conv2d(3, module.widths[0], 3, 1, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(module.widths[0])
    cin = module.widths[0]
    for stage, (blocks, width) in enumerate(zip(module.stage_sizes, module.widths)):
      layer = []
      for i in range(blocks):
        layer.append(TorchBasicBlock(cin, width, 2 if stage > 0 and i == 0 else 1))
        cin = width
      setattr(self, f'layer{stage + 1}', tnn.Sequential(*layer))
    self.num_stages = len(module.stage_sizes)
    self.fc = tnn.Linear(cin, module.num_classes)

  def forward(self, images):
    x = F.relu(self.bn1(self.conv1((images - self.mean) / self.std)))
    for stage in range(self.num_stages):
      x = getattr(self, f'layer{stage + 1}')(x)
    return self.fc(x.mean((2, 3)))


def distillation(logits, teacher_logits, t: float) -> torch.Tensor:
  """The soft-label loss of `steps.train_step` (loss='distillation') at temperature t."""
  return -(F.softmax(teacher_logits / t, -1) * F.log_softmax(logits / t, -1)).sum(-1).mean()


def nchw(x) -> torch.Tensor:
  return from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


_jit_apply = jax.jit(lambda apply_fn, variables, x: apply_fn(variables, x, train=False),
                     static_argnums=0)


def check_teacher_logits(module, variables, torch_teacher, images) -> float:
  """The teachers' logits on NHWC `images` agree: the relative max difference."""
  ref = np.asarray(_jit_apply(module.apply, variables, jnp.asarray(images)))
  with torch.no_grad():
    out = host(torch_teacher.eval()(nchw(images)))
  diff = float(np.abs(ref - out).max() / max(1.0, np.abs(ref).max()))
  if not diff <= LOGITS_TOL:
    raise ParityError(f'Teacher logits differ: max |JAX - torch| / max(1, max |logit|) = '
                      f'{diff:.3g} > {LOGITS_TOL:g}: the weight conversion or the torch module '
                      'is wrong.')
  return diff


def check_losses(row, step, jax_terms, torch_terms):
  """Relative differences of every loss term; ParityError when one is out of tolerance."""
  diffs = {k: rel_diff(jax_terms[k], torch_terms[k]) for k in jax_terms}
  bad = {k: (jax_terms[k], torch_terms[k]) for k, d in diffs.items() if not d <= LOSS_RTOL}
  if bad:
    shown = ', '.join(f'{k}: JAX {a:.7g} torch {b:.7g}' for k, (a, b) in bad.items())
    raise ParityError(f'{row}, step {step}: losses differ beyond rtol {LOSS_RTOL:g} ({shown}).')
  return max(diffs.values())


class Update(NamedTuple):
  """One tensor's comparison: relative L2 and relative max differences of the updates, and
  whether they passed on the rounding floor alone (the relative one being meaningless)."""
  rel: float
  rel_max: float
  at_rounding: bool = False


def check_update(row, what, jax_delta, torch_delta, scale: float = 0.0, param=None) -> Update:
  """Compares two updates of one tensor: ||JAX - torch|| <= UPDATE_RTOL ||JAX||, or, for an
  update at rounding level, <= the floor RESOLUTION * scale * sqrt(size) (`scale`: the
  largest |update| of the tensor's group, `check_updates`) + 2 u ||param|| (`param`: the
  tensor before the update; each side rounds the updated tensor once, by <= u of it).
  ParityError when neither holds."""
  jax_delta, torch_delta = np.asarray(jax_delta, np.float64), np.asarray(torch_delta, np.float64)
  diff = jax_delta - torch_delta
  norm, diff_norm = np.linalg.norm(jax_delta), np.linalg.norm(diff)
  rel = diff_norm / norm if norm > 0 else (0.0 if diff_norm == 0 else float('inf'))
  peak = np.abs(jax_delta).max(initial=0.0)
  rel_max = np.abs(diff).max(initial=0.0) / peak if peak > 0 else rel
  floor = RESOLUTION * scale * np.sqrt(diff.size)
  if param is not None:
    floor += 2 * EPS32 * np.linalg.norm(np.asarray(param, np.float64))
  if rel <= UPDATE_RTOL:
    return Update(float(rel), float(rel_max))
  if diff_norm <= floor:
    return Update(float(rel), float(rel_max), True)
  raise ParityError(f'{row}: the update of {what} differs: ||JAX - torch|| / ||JAX|| = '
                    f'{rel:.3g} > {UPDATE_RTOL:g} (max |JAX - torch| {np.abs(diff).max():.3g}, '
                    f'max |update| {peak:.3g}), and ||JAX - torch|| = {diff_norm:.3g} is above '
                    f'the rounding floor {floor:.3g} ({RESOLUTION:g} of the group\'s largest '
                    f'|update| {scale:.3g} per element).')


def check_updates(row, pairs: Dict[str, Tuple], what: str = '{}', params=None) -> Dict:
  """`check_update` on every tensor of one group, {key: (JAX update, torch update)}, against
  the group's largest |update| (either side). `what` formats a key for the messages;
  `params`: {key: the tensor before the update}. Returns {'worst': (Update, key) of the
  largest relative difference among those compared relatively, 'worst_max': the largest
  relative max difference among them, 'at_rounding': keys that passed on the floor alone,
  'scale', 'tensors'}."""
  scale = max((max(np.abs(np.asarray(a)).max(initial=0.0), np.abs(np.asarray(b)).max(initial=0.0))
               for a, b in pairs.values()), default=0.0)
  worst, worst_max, at_rounding = (Update(0.0, 0.0), None), 0.0, []
  for key, (a, b) in pairs.items():
    result = check_update(row, what.format(key), a, b, scale,
                          None if params is None else params[key])
    if result.at_rounding:
      at_rounding.append(key)
      continue
    worst_max = max(worst_max, result.rel_max)
    if result.rel >= worst[0].rel:
      worst = (result, key)
  return {'worst': worst, 'worst_max': worst_max, 'at_rounding': at_rounding,
          'scale': float(scale), 'tensors': len(pairs)}


def describe_updates(summary, what: str = 'updates') -> str:
  (worst, key), rounding = summary['worst'], summary['at_rounding']
  text = (f'{what} ({summary["tensors"]} tensors): worst rel L2 diff {worst.rel:.2e} at {key} '
          f'(tol {UPDATE_RTOL:g}), worst max |diff| / max |update| {summary["worst_max"]:.2e}')
  if rounding:
    shown = ', '.join(rounding[:3]) + (f' and {len(rounding) - 3} more' if len(rounding) > 3
                                       else '')
    text += (f'; {len(rounding)} at rounding level, their difference within {RESOLUTION:g} of '
             f'the largest |update| {summary["scale"]:.2e} per element, not compared '
             f'relatively: {shown}')
  return text


def decided(grad, scale: float) -> np.ndarray:
  """Where a gradient's sign is not rounding: |grad| above RESOLUTION of `scale`, its
  group's largest |gradient|. Adam's first step is about lr * sign(grad): elsewhere the two
  sides may step either way."""
  return np.abs(np.asarray(grad, np.float64)) > RESOLUTION * scale


def from_numpy(x) -> torch.Tensor:
  """A torch tensor of `x` on torch's default device (compare_torch.py sets it)."""
  return torch.from_numpy(np.asarray(x)).to(torch.get_default_device())


def host(t: torch.Tensor) -> np.ndarray:
  return t.detach().cpu().numpy()


def synchronize() -> None:
  """Waits for torch's queued work (CUDA runs it asynchronously)."""
  if torch.get_default_device().type == 'cuda':
    torch.cuda.synchronize()


def path_timers(bench, paths, batch):
  """(jax_call(i), torch_call(i), paths) of a supernet row `bench` (its `p_step`, `state0`,
  `devices`, `r_teacher`, `torch_model`, `torch_optimizer`, `torch_step`): step i runs on
  `paths[i]`, JAX on `batch(i)`, both from the initial weights and fresh optimizer states
  (torch on a copy: `check` still sees the initial weights)."""
  state = {'jax': steps.replicate(bench.state0, bench.devices)}
  model = copy.deepcopy(bench.torch_model)
  opt = bench.torch_optimizer(model)

  def jax_call(i):
    state['jax'], _ = jax.block_until_ready(bench.p_step(state['jax'], batch(i), bench.r_teacher))

  def torch_call(i):
    bench.torch_step(model, opt, paths[i], i)

  return jax_call, torch_call, paths


def interleaved(jax_call, torch_call, repeats: int, warmup: int):
  """ms of every call of each side, calls alternating JAX, torch, JAX, ... (warm-up first)."""
  jax_ms, torch_ms = [], []
  for i in range(warmup + repeats):
    start = time.perf_counter()
    jax_call(i)
    middle = time.perf_counter()
    torch_call(i)
    synchronize()
    end = time.perf_counter()
    jax_ms.append((middle - start) * 1e3)
    torch_ms.append((end - middle) * 1e3)
  return jax_ms, torch_ms
