"""1x1 convolutions as matrix products on XLA:CPU: `jnp.dot` over the 4-D NHWC input against
the same product on the pixels as rows of a 2-D matrix (`layers.PointwiseConv` keeps the
4-D form: the 2-D one is faster alone, not in the rows' steps; docs/benchmarks.md).

  python benchmarks/pointwise_conv.py                 # forward + backward of one layer
  python benchmarks/pointwise_conv.py --rows=spos_supernet,proxyless_weight

The first form times one layer's forward + backward at shapes of the supernets' expansions
and projections; `--rows` times compare_torch.py's rows' JAX steps built with each form
(benchmarks/ab_rows.py). The first form imports neither TensorFlow nor torch.
"""
import functools
import os

import ab_rows  # benchmarks/
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dfnas_jax.models import layers

flags.DEFINE_list('rows', [], "compare_torch.py rows whose JAX steps to time with each form "
                  "(e.g. spos_supernet); empty: one layer at a few shapes.")
flags.DEFINE_integer('repeats', 15, 'Timed calls per variant (the median is reported).')
FLAGS = flags.FLAGS

# (NHWC input, output channels)
SHAPES = (((32, 16, 16, 48), 48), ((32, 8, 8, 96), 192), ((16, 4, 4, 240), 240),
          ((32, 32, 32, 16), 48))


class PointwiseConv(layers.PointwiseConv):  # the same name: the same auto-named variables
  """The product on the pixels as rows of one 2-D matrix."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', layers.conv_init, (1, 1, x.shape[-1], self.features))
    y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel[0, 0].astype(self.dtype))
    return y.reshape(*x.shape[:-1], self.features)


VARIANTS = {'4-D dot': layers.PointwiseConv, '2-D dot': PointwiseConv}


def layers_alone(repeats: int):
  rng = np.random.default_rng(0)
  for shape, features in SHAPES:
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    fns, grads = {}, {}
    for name, cls in VARIANTS.items():
      module = cls(features)
      variables = module.init(jax.random.PRNGKey(0), x)
      loss = lambda v, x, m=module: jnp.sum(jnp.sin(m.apply(v, x)))  # noqa: E731
      fns[name] = jax.jit(jax.grad(loss, argnums=(0, 1)))
      grads[name] = jax.block_until_ready(fns[name](variables, x))
    first, second = (jax.tree_util.tree_leaves(g) for g in grads.values())
    # The same gradients up to float32 summation order: the kernel's sums over n <= 32 *
    # 32 * 32 pixels are off by ~sqrt(n) u = 1.1e-5 of their terms' magnitudes: 1e-4 is 9x.
    for a, b in zip(first, second):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))
    calls = {name: (lambda i, f=f: jax.block_until_ready(f(variables, x)))
             for name, f in fns.items()}
    ms = ab_rows.median_ms(calls, repeats)
    print(f'{"x".join(map(str, shape))} -> {features}: '
          + ', '.join(f'{name} {t:.2f} ms' for name, t in ms.items()), flush=True)


def main(_):
  print(f'JAX {jax.__version__} on {jax.default_backend()}; load average '
        f'{" ".join(f"{x:.1f}" for x in os.getloadavg())}')
  if FLAGS.rows:
    variants = {name: functools.partial(ab_rows.patched, layers, 'PointwiseConv', cls)
                for name, cls in VARIANTS.items()}  # what the supernets build
    ab_rows.time_rows(FLAGS.rows, variants, FLAGS.repeats)
  else:
    layers_alone(FLAGS.repeats)


if __name__ == '__main__':
  app.run(main)
