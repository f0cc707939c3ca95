"""Building blocks shared by the search spaces: initializer, depthwise convolution, choice layers."""
import re
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


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
  h, w = out_side(x.shape[1], stride), out_side(x.shape[2], stride)
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = range(0, k * dilation, dilation)
  windows = [padded[:, di:di + stride * (h - 1) + 1:stride, dj:dj + stride * (w - 1) + 1:stride]
             for di in offsets for dj in offsets]
  if cpu_method == 'stacked':
    return jnp.einsum('tnhwc,tc->nhwc', jnp.stack(windows), kernel.reshape(k * k, -1))
  if cpu_method != 'sum':
    raise ValueError(f"cpu_method must be 'sum', 'stacked' or 'dense', got {cpu_method!r}")
  return sum(window * tap for window, tap in zip(windows, kernel.reshape(k * k, -1)))


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
