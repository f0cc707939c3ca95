"""Blocks shared by the search spaces: initializer, depthwise convolution, choice layers."""
import functools
import re
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfnas_jax.models import normalization

# torchvision's default: kaiming-normal, fan-out, for ReLU.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def batch_norm(train: bool, momentum: float, axis_name: Optional[str], dtype, *,
               affine: bool = True, epsilon: float = 1e-5) -> Callable[..., nn.BatchNorm]:
  """BatchNorm as every network here uses it, awaiting `name=`: batch statistics reduced
  over `axis_name` in training, the running ones otherwise (nn.BatchNorm's variables and
  values; in training its gradient is written by hand, see normalization.py)."""
  return functools.partial(normalization.BatchNorm, use_running_average=not train,
                           momentum=momentum, epsilon=epsilon, use_scale=affine,
                           use_bias=affine, dtype=dtype, axis_name=axis_name if train else None)


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
  on_cpu = jax.default_backend() == 'cpu'
  if not on_cpu:
    return _convolution(x, kernel, stride, dilation, x.shape[-1])
  if cpu_method == 'dense':
    return dense_depthwise_conv(x, kernel, stride, dilation)
  if cpu_method == 'stacked':
    windows = _windows(x, k, stride, dilation)
    return jnp.einsum('tnhwc,tc->nhwc', jnp.stack(windows), kernel.reshape(k * k, -1))
  if cpu_method != 'sum':
    raise ValueError(f"cpu_method must be 'sum', 'stacked' or 'dense', got {cpu_method!r}")
  return shifted_sum_conv(x, kernel, stride, dilation)


def _same_padded(x, k: int, dilation: int):
  """`x` zero-padded on both spatial sides by PyTorch's 'same' padding d * (k - 1) // 2."""
  pad = dilation * (k - 1) // 2
  # lax.pad, not jnp.pad: jnp.pad's inner jit breaks JAX 0.10's second derivatives of the
  # custom-gradient convolutions inside a scan (DARTS' edges), mixing up their residuals.
  return jax.lax.pad(x, jnp.zeros((), x.dtype),
                     ((0, 0, 0), (pad, pad, 0), (pad, pad, 0), (0, 0, 0)))


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
  # Column tap j pairs padded column d*j + s*o with output column o: sum those entries as
  # a product with a 0/1 mask (built from iotas: a gather's constant indices would break
  # the second derivatives in a scan, see _same_padded).
  iota = functools.partial(jax.lax.broadcasted_iota, jnp.int32, (k, wp, wo))
  mask = (iota(1) == dilation * iota(0) + stride * iota(2)).astype(r.dtype)
  return jnp.einsum('cipo,jpo->ijc', r, mask)


shifted_sum_conv.defvjp(_shifted_sum_forward, _shifted_sum_backward)


def _convolution(x, kernel, stride: int, dilation: int, groups: int):
  pad = dilation * (kernel.shape[0] - 1) // 2
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), ((pad, pad), (pad, pad)), rhs_dilation=(dilation, dilation),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)


def _on_diagonal(kernel):
  """[k, k, 1, C] depthwise kernel -> the [k, k, C, C] dense one with it on the diagonal.

  Each row of C + 1 entries, the tap then C zeros, read back in rows of C puts the taps on
  the diagonal. Built from the kernel alone: a constant such as jnp.eye(C) is hoisted out
  of DARTS' edge scans, which breaks JAX 0.10's second derivatives of the custom-gradient
  functions below (their residuals get mixed up with the hoisted constants)."""
  k, c = kernel.shape[0], kernel.shape[-1]
  rows = jax.lax.pad(kernel.reshape(k, k, c, 1), jnp.zeros((), kernel.dtype),
                     ((0, 0, 0), (0, 0, 0), (0, 0, 0), (0, c, 0)))
  return rows.reshape(k, k, c * (c + 1))[:, :, :c * c].reshape(k, k, c, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dense_depthwise_conv(x, kernel, stride: int, dilation: int):
  """Depthwise 'same' convolution as an ordinary one with the kernel on the diagonal
  (`depthwise_conv`'s 'dense' CPU method). Autodiff's kernel gradient of it is a
  convolution XLA:CPU leaves in a slow layout inside DARTS' scanned, twice-differentiated
  cells (docs/benchmarks.md); here the kernel gradient is the shifted sums' matrix
  product, and the input gradient is `dense_depthwise_conv_transpose`, whose own
  gradients are again these two functions, so that every order of derivative avoids it."""
  return _convolution(x, _on_diagonal(kernel), stride, dilation, 1)


def _dense_forward(x, kernel, stride, dilation):
  return dense_depthwise_conv(x, kernel, stride, dilation), (x, kernel)


def _dense_backward(stride, dilation, residuals, grad):
  x, kernel = residuals
  grad_x = dense_depthwise_conv_transpose(grad, kernel, stride, dilation, x.shape[1:3])
  grad_kernel = _shifted_sum_kernel_grad(x, grad, kernel.shape[0], stride, dilation)
  return grad_x, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


dense_depthwise_conv.defvjp(_dense_forward, _dense_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def dense_depthwise_conv_transpose(grad, kernel, stride: int, dilation: int,
                                   in_side: Tuple[int, int]):
  """The input gradient of `dense_depthwise_conv(x, kernel)` for output gradient `grad`,
  `x` being [N, *in_side, C]."""
  # Output o reads input s*o + d*t - pad: spread `grad` to stride s (lhs dilation) and
  # correlate it with the flipped kernel at dilation d.
  k = kernel.shape[0]
  low = dilation * (k - 1) - dilation * (k - 1) // 2
  padding = [(low, side - stride * (out - 1) - 1 - low + dilation * (k - 1))
             for side, out in zip(in_side, grad.shape[1:3])]
  return jax.lax.conv_general_dilated(
      grad, _on_diagonal(kernel[::-1, ::-1]), (1, 1), padding, lhs_dilation=(stride, stride),
      rhs_dilation=(dilation, dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _transpose_forward(grad, kernel, stride, dilation, in_side):
  return dense_depthwise_conv_transpose(grad, kernel, stride, dilation, in_side), (grad, kernel)


def _transpose_backward(stride, dilation, in_side, residuals, cotangent):
  grad, kernel = residuals
  # <transpose(g, w), c> = <g, conv(c, w)>: the same bilinear form with c in x's place.
  grad_grad = dense_depthwise_conv(cotangent, kernel, stride, dilation)
  grad_kernel = _shifted_sum_kernel_grad(cotangent, grad, kernel.shape[0], stride, dilation)
  return grad_grad, grad_kernel.reshape(kernel.shape).astype(kernel.dtype)


dense_depthwise_conv_transpose.defvjp(_transpose_forward, _transpose_backward)


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
