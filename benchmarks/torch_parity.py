"""What every row of benchmarks/compare_torch.py shares: the parity tolerances and checks,
Flax variables loaded into torch modules, the torch twin of the CIFAR ResNet teachers, and
the interleaved timing. Imports nothing that imports TensorFlow.
"""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # before JAX starts: both sides on the CPU

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn as tnn

from dfnas_jax import teachers
from dfnas_jax.models import resnet
from dfnas_jax.teachers import convert

# Parity tolerances, float32 on both sides. Logits and losses are smooth: observed
# differences are <= 3e-6. The update is compared in L2, not elementwise: a ReLU input within
# float rounding of 0 can fall on opposite sides in the two (synthesis at batch 128: one unit
# of the teacher's layer3.0, where torch's side differs from a float64 reference), which
# changes a patch of one image's gradient and, through Adam's per-pixel normalization, its
# update by up to ~4% of the step size (L2: 1.3e-4). The supernet's gradients at
# initialization are ill-conditioned on some tensors: on the check path both float32 sides
# are 2e-3 (torch) to 5e-3 (JAX) from float64 on layer 2's Xception choice, 5.5e-3 apart.
# Real differences (a wrong window or flip for one image of 128, learning rate, beta, loss
# weight) are >= ~1e-1 in L2.
LOGITS_TOL = 1e-4  # max |logit difference| / max(1, max |logit|)
LOSS_RTOL = 1e-4   # |loss difference| / |loss|, the total and every term
UPDATE_RTOL = 2e-2  # ||update difference|| / ||update||, per compared tensor


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
        state[name].copy_(torch.from_numpy(value))
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
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


_jit_apply = jax.jit(lambda apply_fn, variables, x: apply_fn(variables, x, train=False),
                     static_argnums=0)


def check_teacher_logits(module, variables, torch_teacher, images) -> float:
  """The teachers' logits on NHWC `images` agree: the relative max difference."""
  ref = np.asarray(_jit_apply(module.apply, variables, jnp.asarray(images)))
  with torch.no_grad():
    out = torch_teacher.eval()(nchw(images)).numpy()
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


def check_update(row, what, jax_delta, torch_delta):
  """(relative L2 difference, relative max difference) of two updates of one tensor."""
  jax_delta, torch_delta = np.asarray(jax_delta, np.float64), np.asarray(torch_delta, np.float64)
  diff = jax_delta - torch_delta
  norm, diff_norm = np.linalg.norm(jax_delta), np.linalg.norm(diff)
  rel = diff_norm / norm if norm > 0 else (0.0 if diff_norm == 0 else float('inf'))
  peak = np.abs(jax_delta).max()
  rel_max = np.abs(diff).max() / peak if peak > 0 else rel
  if not rel <= UPDATE_RTOL:
    raise ParityError(f'{row}: the update of {what} differs: ||JAX - torch|| / ||JAX|| = '
                      f'{rel:.3g} > {UPDATE_RTOL:g} (max |JAX - torch| {np.abs(diff).max():.3g}, '
                      f'max |update| {peak:.3g}).')
  return float(rel), float(rel_max)


def interleaved(jax_call, torch_call, repeats: int, warmup: int):
  """ms of every call of each side, calls alternating JAX, torch, JAX, ... (warm-up first)."""
  jax_ms, torch_ms = [], []
  for i in range(warmup + repeats):
    start = time.perf_counter()
    jax_call(i)
    middle = time.perf_counter()
    torch_call(i)
    end = time.perf_counter()
    jax_ms.append((middle - start) * 1e3)
    torch_ms.append((end - middle) * 1e3)
  return jax_ms, torch_ms
