"""BatchNorm with its training-mode gradient written by hand.

The supernet steps spend most of their XLA:CPU time in elementwise and reduction
fusions, much of it autodiff's BatchNorm gradient (docs/benchmarks.md: "Where the time
goes"); the textbook three-term gradient, with both channel sums in one pass, does the
same work in fewer, larger fusions.
"""
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm`: the same variables, values and running-statistics update, and the
  same gradients, which `batch_norm_train` computes by hand in training mode.

  Initialization, running statistics, masks, grouped devices and the exact-variance
  option go to `nn.BatchNorm` itself. Subclassing keeps `isinstance(m, nn.BatchNorm)`
  true, which the synthesis' feature-statistics hooks rely on.
  """

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None):
    use_running_average = nn.merge_param('use_running_average', self.use_running_average,
                                         use_running_average)
    if (use_running_average or mask is not None or self.is_initializing()
        or self.axis_index_groups is not None or not self.use_fast_variance
        or self.axis not in (-1, x.ndim - 1) or not self.force_float32_reductions):
      given_at_call = None if self.use_running_average is not None else use_running_average
      return super().__call__(x, given_at_call, mask=mask)
    features = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32),
                            (features,))
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32),
                           (features,))
    scale = (self.param('scale', self.scale_init, (features,), self.param_dtype)
             if self.use_scale else None)
    bias = (self.param('bias', self.bias_init, (features,), self.param_dtype)
            if self.use_bias else None)
    dtype = self.dtype or jnp.result_type(*(a for a in (x, scale, bias) if a is not None))
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.axis_name,
                                    jnp.dtype(dtype))
    mean, var = jax.lax.stop_gradient((mean, var))
    ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
    ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


def _channel_means(axis_name: Optional[str], n: int, *xs):
  """Per-channel means over the batch and spatial axes, and over devices on `axis_name`
  (one collective for all of them, as flax does)."""
  means = jnp.stack([x.reshape(-1, x.shape[-1]).sum(0) / n for x in xs])
  return jax.lax.pmean(means, axis_name) if axis_name else means


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x, scale, bias, epsilon: float, axis_name: Optional[str], dtype):
  """(normalized x in `dtype`, batch mean, batch variance), statistics in float32 over all
  but the last axis and over devices on `axis_name`; `scale` and `bias` may be None."""
  return _forward(x, scale, bias, epsilon, axis_name, dtype)[0]


def _forward(x, scale, bias, epsilon, axis_name, dtype):
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  n = x.size // x.shape[-1]
  mean, mean_sq = _channel_means(axis_name, n, xf, jnp.square(xf))
  var = jnp.maximum(0.0, mean_sq - jnp.square(mean))
  rstd = jax.lax.rsqrt(var + epsilon)
  mul = rstd if scale is None else rstd * scale
  y = (x - mean) * mul
  if bias is not None:
    y = y + bias
  return (y.astype(dtype), mean, var), (x, scale, bias, mean, rstd)


def _backward(epsilon, axis_name, dtype, residuals, grads):
  del epsilon, dtype
  x, scale, bias, mean, rstd = residuals
  grad_y, grad_mean, grad_var = grads
  n = x.size // x.shape[-1]
  centered = x.astype(mean.dtype) - mean
  x_hat = centered * rstd
  grad_y = grad_y.astype(mean.dtype)
  flat_g = grad_y.reshape(-1, x.shape[-1])
  sum_g = flat_g.sum(0)
  sum_g_x_hat = (flat_g * x_hat.reshape(flat_g.shape)).sum(0)
  # The sums are this device's; x's gradient sees the whole batch's statistics.
  mean_g, mean_g_x_hat, grad_mean, grad_var = (
      jax.lax.pmean(jnp.stack([sum_g / n, sum_g_x_hat / n, grad_mean, grad_var]), axis_name)
      if axis_name else (sum_g / n, sum_g_x_hat / n, grad_mean, grad_var))
  mul = rstd if scale is None else rstd * scale
  grad_x = (mul * (grad_y - mean_g - x_hat * mean_g_x_hat)
            + (grad_mean + 2 * centered * grad_var) / n)
  return (grad_x.astype(x.dtype),
          None if scale is None else sum_g_x_hat.astype(scale.dtype),
          None if bias is None else sum_g.astype(bias.dtype))


batch_norm_train.defvjp(_forward, _backward)
