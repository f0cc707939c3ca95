"""Blocks shared by the search spaces: initializer, depthwise convolution, choice layers."""
import functools
import re
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# torchvision's default: kaiming-normal, fan-out, for ReLU.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def batch_norm(train: bool, momentum: float, axis_name: Optional[str], dtype, *,
               affine: bool = True, epsilon: float = 1e-5) -> Callable[..., nn.BatchNorm]:
  """nn.BatchNorm as every network here uses it, awaiting `name=`: batch statistics
  reduced over `axis_name` in training, the running ones otherwise."""
  return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=momentum,
                           epsilon=epsilon, use_scale=affine, use_bias=affine, dtype=dtype,
                           axis_name=axis_name if train else None)


def normalize(images, mean: Sequence[float], std: Sequence[float], dtype):
  """Images in [0, 1] -> the network's input: every model normalizes its own inputs."""
  return ((images - jnp.asarray(mean)) / jnp.asarray(std)).astype(dtype)


class LayerwiseNet(nn.Module):
  """The fields the layer-wise spaces' networks (SPOS, ProxylessNAS) share: a supernet
  (`choices=None`) or one architecture of `space`, whose input statistics it uses."""
  space: Any  # the space module's SearchSpace
  num_classes: int
  choices: Optional[Tuple[int, ...]] = None
  dropout: float = 0.0
  bn_momentum: float = 0.9
  axis_name: Optional[str] = 'batch'
  dtype: Any = jnp.float32

  @property
  def mean(self):
    return self.space.mean

  @property
  def std(self):
    return self.space.std


def digits_name(space: str, choices: Sequence[int]) -> str:
  """The name of a layer-wise architecture: '<space>:<one digit per layer>'."""
  return f'{space}:' + ''.join(str(c) for c in choices)


def parse_digits_name(name: str, spaces, kind: str) -> Tuple[str, Optional[Tuple[int, ...]]]:
  """'<space>' -> (space, None); '<space>:0123...' -> (space, choices checked by the space)."""
  match = re.fullmatch(r'(\w+?)(?::(\d+))?', name)
  if not match or match.group(1) not in spaces:
    raise ValueError(f'{name!r} is not a {kind} architecture: expected one of {sorted(spaces)}, '
                     'optionally followed by ":" and one digit per layer.')
  space, digits = match.groups()
  return space, spaces[space].check(digits) if digits else None


def out_side(side: int, stride: int) -> int:
  """Output side of a 'same'-padded convolution or pooling."""
  return -(-side // stride)


def depthwise_conv(x, kernel, stride: int = 1, dilation: int = 1, cpu_method: str = 'sum'):
  """Depthwise 'same' convolution (PyTorch padding dilation * (k - 1) // 2), kernel [k, k, 1, C].

  XLA:CPU runs grouped convolutions about 40x slower than a sum of k*k shifted
  multiplies (forward, measured at 64x32x32x32, k=7: 0.19-0.31 s vs 0.005-0.008 s;
  forward+backward 0.64-0.79 s vs 0.23 s), so CPU uses the sum; accelerators use
  the convolution. `cpu_method='stacked'` instead contracts the stacked windows
  with one einsum: 3-5x slower alone, but XLA:CPU no longer duplicates work
  across the many convolutions that share inputs and gradients in a DARTS cell
  (weight gradient of one search cell: 20.6 s -> 1.9 s per step, compile
  271 s -> 58 s). `cpu_method='dense'` runs an ordinary convolution with the
  kernel on the diagonal of a dense C x C one: C times the multiplies, but
  XLA:CPU's fastest path at DARTS widths (forward+backward at 32x32x32x8, 3x3:
  9 ms vs 24 ms stacked, 35 ms sum, 43 ms grouped).
  """
  k = kernel.shape[0]
  pad = dilation * (k - 1) // 2
  on_cpu = jax.default_backend() == 'cpu'
  if not on_cpu or cpu_method == 'dense':
    groups = x.shape[-1]
    if on_cpu:  # the same kernel on the diagonal of a dense one: no grouped convolution
      kernel, groups = kernel * jnp.eye(x.shape[-1], dtype=kernel.dtype), 1
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), ((pad, pad), (pad, pad)), rhs_dilation=(dilation, dilation),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)
  if cpu_method == 'stacked':
    windows = _windows(x, k, stride, dilation)
    return jnp.einsum('tnhwc,tc->nhwc', jnp.stack(windows), kernel.reshape(k * k, -1))
  if cpu_method != 'sum':
    raise ValueError(f"cpu_method must be 'sum', 'stacked' or 'dense', got {cpu_method!r}")
  return shifted_sum_conv(x, kernel, stride, dilation)


def _same_padded(x, k: int, dilation: int):
  """`x` zero-padded on both spatial sides by PyTorch's 'same' padding d * (k - 1) // 2."""
  pad = dilation * (k - 1) // 2
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def _windows(x, k: int, stride: int, dilation: int):
  """The k*k strided views of zero-padded `x` that tap (i, j) of a 'same' kernel reads."""
  h, w = out_side(x.shape[1], stride), out_side(x.shape[2], stride)
  padded = _same_padded(x, k, dilation)
  offsets = range(0, k * dilation, dilation)
  return [padded[:, di:di + stride * (h - 1) + 1:stride, dj:dj + stride * (w - 1) + 1:stride]
          for di in offsets for dj in offsets]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def shifted_sum_conv(x, kernel, stride: int, dilation: int):
  """Depthwise 'same' convolution as a sum of k*k shifted multiplies (`depthwise_conv`'s
  CPU method), with its gradients written by hand: XLA:CPU runs autodiff's (scatters into
  padded, strided slices; k*k window reductions) several times slower
  (docs/benchmarks.md)."""
  k = kernel.shape[0]
  return sum(window * tap for window, tap in zip(_windows(x, k, stride, dilation),
                                                 kernel.reshape(k * k, -1)))


def _shifted_sum_forward(x, kernel, stride, dilation):
  return shifted_sum_conv(x, kernel, stride, dilation), (x, kernel)


def _shifted_sum_backward(stride, dilation, residuals, grad):
  x, kernel = residuals
  k, (_, h, w, _) = kernel.shape[0], x.shape
  pad = dilation * (k - 1) // 2
  # Output position o reads padded input s*o + d*t, i.e. input s*o + d*t - pad. Spread the
  # gradient to stride s (interior padding) and shift it so that window t' = k-1-t of the
  # result lines up with the input: then grad_x = sum_t window_{k-1-t} * kernel_t.
  low = dilation * (k - 1) - pad
  def spread(size, out):  # padding of one spatial axis; a negative high side crops
    return (low, size + pad - (stride * (out - 1) + 1), stride - 1)
  spread_grad = jax.lax.pad(grad, jnp.zeros((), grad.dtype),
                            ((0, 0, 0), spread(h, grad.shape[1]), spread(w, grad.shape[2]),
                             (0, 0, 0)))
  taps = kernel.reshape(k * k, -1)
  grad_x = 0
  for i in range(k):
    for j in range(k):
      di, dj = dilation * (k - 1 - i), dilation * (k - 1 - j)
      grad_x = grad_x + spread_grad[:, di:di + h, dj:dj + w] * taps[i * k + j]
  grad_kernel = _shifted_sum_kernel_grad(x, grad, k, stride, dilation)
  return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


def _shifted_sum_kernel_grad(x, grad, k: int, stride: int, dilation: int):
  """[k, k, C] gradient of the kernel: per channel, one matrix product over batch and
  output rows (the k row offsets side by side), then the diagonals that pair each
  column offset with the output columns."""
  n, _, _, c = x.shape
  ho, wo = grad.shape[1], grad.shape[2]
  padded = _same_padded(x, k, dilation)
  wp = padded.shape[2]
  rows = jnp.stack([padded[:, dilation * i:dilation * i + stride * (ho - 1) + 1:stride]
                    for i in range(k)], 3)  # [n, ho, wp, k, c]
  a = rows.transpose(4, 0, 1, 3, 2).reshape(c, n * ho, k * wp)
  b = grad.transpose(3, 0, 1, 2).reshape(c, n * ho, wo)
  r = jax.lax.dot_general(a, b, (((1,), (1,)), ((0,), (0,)))).reshape(c, k, wp, wo)
  cols = np.arange(k)[:, None] * dilation + stride * np.arange(wo)[None, :]
  taps = r[:, :, cols, np.arange(wo)[None, :]].sum(-1)  # [c, k, k]
  return taps.transpose(1, 2, 0)


shifted_sum_conv.defvjp(_shifted_sum_forward, _shifted_sum_backward)


class DepthwiseConv(nn.Module):
  """`nn.Conv(feature_group_count=C)`'s parameters, computed by `depthwise_conv`."""
  kernel_size: int
  stride: int = 1
  dtype: Any = jnp.float32
  dilation: int = 1
  cpu_method: str = 'sum'

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param('kernel', conv_init, (self.kernel_size, self.kernel_size, 1, channels))
    return depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride,
                          self.dilation, self.cpu_method)


class PointwiseConv(nn.Module):
  """`nn.Conv(features, (1, 1), use_bias=False)`'s `kernel`, applied as a matrix product over
  channels: XLA:CPU runs the convolution's gradients several times slower
  (docs/benchmarks.md)."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', conv_init, (1, 1, x.shape[-1], self.features))
    return jnp.dot(x.astype(self.dtype), kernel[0, 0].astype(self.dtype))


# --- Choice layers of one-shot supernets (SPOS, ProxylessNAS) ---------------------------
#
# A supernet's searched layer `layer{i}` holds its candidates as `choices_{c}`, and the
# path is a *traced* integer per layer, so one compiled step serves every path.


def run_choice(module: nn.Module, choice, branches: Sequence[Callable], x):
  """`branches[choice](module, x)` through `nn.switch`.

  At initialization every branch runs, so every choice gets its variables.
  """
  if module.is_mutable_collection('params'):
    return jnp.stack([branch(module, x) for branch in branches])[choice]
  return nn.switch(choice, branches, module, x)


_CHOICE_PATH = re.compile(r'layer(\d+)$'), re.compile(r'choices_(\d+)$')


def _choice_of(path) -> Optional[Tuple[int, int]]:
  """(layer, choice) if a pytree path runs through `layer{i}/choices_{c}`, else None."""
  names = [getattr(k, 'key', None) for k in path]
  for a, b in zip(names, names[1:]):
    if isinstance(a, str) and isinstance(b, str):
      layer, choice = _CHOICE_PATH[0].match(a), _CHOICE_PATH[1].match(b)
      if layer and choice:
        return int(layer.group(1)), int(choice.group(1))
  return None


def keep_unused_choices(new_state, old_state, batch):
  """`steps.train_step`'s `after_update` for a supernet trained on one path
  (`batch['arch']`) per step: the choices off the path keep their parameters and their
  optimizer state exactly."""
  arch = batch['arch']
  return new_state.replace(params=keep_unused(new_state.params, old_state.params, arch),
                           opt_state=keep_unused(new_state.opt_state, old_state.opt_state, arch))


def keep_unused(new_tree, old_tree, architecture):
  """`new_tree` where the path `architecture` used the parameter, `old_tree` elsewhere.

  Works on params and on optimizer states that mirror them (momentum traces), so
  choices a step did not use get no update at all: no momentum, no weight decay
  (PyTorch references skip parameters without a gradient).
  """
  def select(path, new, old):
    where = _choice_of(path)
    if where is None:
      return new
    return jnp.where(architecture[where[0]] == where[1], new, old)
  return jax.tree_util.tree_map_with_path(select, new_tree, old_tree)
