"""BatchNorm in training mode, forward + backward, on XLA:CPU: flax.linen.BatchNorm against
a BatchNorm whose gradient is written by hand, and one whose channel sums are matrix products.

  python benchmarks/batch_norm.py

The profiles of the supernet steps (docs/benchmarks.md) put most of JAX's time in
elementwise and reduction fusions; this measures how much of that a hand-written gradient
would take back. Calls alternate between the variants; the median of 15 per variant.
Imports nothing that imports TensorFlow.
"""
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

EPSILON = 1e-5
SHAPES = ((32, 32, 32, 48), (32, 16, 16, 96), (16, 8, 8, 240), (64, 32, 32, 16))


def flax_batch_norm(x, scale, bias):
  variables = {'params': {'scale': scale, 'bias': bias},
               'batch_stats': {'mean': jnp.zeros_like(scale), 'var': jnp.ones_like(scale)}}
  y, _ = nn.BatchNorm(use_running_average=False, epsilon=EPSILON).apply(
      variables, x, mutable=['batch_stats'])
  return y


def _reduce_sum(x):
  return jnp.sum(x, tuple(range(x.ndim - 1)))


def _ones_dot_sum(x):
  flat = x.reshape(-1, x.shape[-1])
  return jnp.dot(jnp.ones((flat.shape[0],), x.dtype), flat)


def hand_written(channel_sum):
  """Batch-statistics normalization with the three-term gradient,
  dx = scale * rstd / n * (n * g - sum(g) - xhat * sum(g * xhat))."""

  def forward(x, scale, bias):
    n = x.size // x.shape[-1]
    mean = channel_sum(x) / n
    var = jnp.maximum(channel_sum(jnp.square(x)) / n - jnp.square(mean), 0.0)
    rstd = jax.lax.rsqrt(var + EPSILON)
    return (x - mean) * rstd * scale + bias, (x, mean, rstd, scale)

  def backward(residuals, g):
    x, mean, rstd, scale = residuals
    n = x.size // x.shape[-1]
    xhat = (x - mean) * rstd
    g_sum, gx_sum = channel_sum(g), channel_sum(g * xhat)
    return (scale * rstd / n) * (n * g - g_sum - xhat * gx_sum), gx_sum, g_sum

  @jax.custom_vjp
  def batch_norm(x, scale, bias):
    return forward(x, scale, bias)[0]

  batch_norm.defvjp(forward, backward)
  return batch_norm


VARIANTS = {'flax.linen.BatchNorm': flax_batch_norm,
            'hand-written gradient': hand_written(_reduce_sum),
            'hand-written, sums as matmuls': hand_written(_ones_dot_sum)}


def main():
  print(f'JAX {jax.__version__} on {jax.default_backend()}; load average '
        f'{" ".join(f"{x:.1f}" for x in os.getloadavg())}')
  rng = np.random.default_rng(0)
  for shape in SHAPES:
    x = jnp.asarray(rng.random(shape, np.float32))
    scale, bias = jnp.ones(shape[-1]), jnp.zeros(shape[-1])
    fns = {name: jax.jit(jax.grad(lambda x, s, b, f=f: jnp.sum(jnp.sin(f(x, s, b))),
                                  argnums=(0, 1, 2)))
           for name, f in VARIANTS.items()}
    grads = {name: jax.block_until_ready(f(x, scale, bias)) for name, f in fns.items()}
    reference = grads['flax.linen.BatchNorm']
    for name, got in grads.items():  # the same gradients, up to float32 summation order
      for a, b in zip(got, reference):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-3 * float(jnp.max(jnp.abs(b))),
                                   err_msg=name)
    ms = {name: [] for name in fns}
    for _ in range(15):
      for name, f in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(f(x, scale, bias))
        ms[name].append((time.perf_counter() - start) * 1e3)
    print(f'{"x".join(map(str, shape)):>12}: '
          + ', '.join(f'{name} {np.median(t):.1f} ms' for name, t in ms.items()))


if __name__ == '__main__':
  main()
