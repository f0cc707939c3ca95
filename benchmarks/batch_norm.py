"""BatchNorm in training mode on XLA:CPU: flax.linen.BatchNorm against the networks' own
(`dfnas_jax.models.normalization.BatchNorm`, whose gradient is written by hand).

  python benchmarks/batch_norm.py                       # forward + backward of one layer
  python benchmarks/batch_norm.py --rows=spos_supernet,nb201_supernet,proxyless_weight

The first form times one layer's forward + backward at a few shapes. `--rows` builds the
JAX steps of benchmarks/compare_torch.py's rows twice, once with each BatchNorm, and times
them interleaved in one process (the machine's load moves both alike): the step-level
before/after of the change. Calls alternate between the variants; medians are reported.
The first form imports nothing that imports TensorFlow or torch; `--rows` needs torch
(compare_torch builds its rows' torch sides too).
"""
import functools
import os

import ab_rows  # benchmarks/
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dfnas_jax.models import normalization

flags.DEFINE_list('rows', [], "compare_torch.py rows whose JAX steps to time with each "
                  "BatchNorm (e.g. spos_supernet); empty: one layer at a few shapes.")
flags.DEFINE_integer('repeats', 15, 'Timed calls per variant (the median is reported).')
FLAGS = flags.FLAGS

SHAPES = ((32, 32, 32, 48), (32, 16, 16, 96), (16, 8, 8, 240), (64, 32, 32, 16))
VARIANTS = {'flax.linen.BatchNorm': nn.BatchNorm,
            'normalization.BatchNorm': normalization.BatchNorm}


def layers_alone(repeats: int):
  rng = np.random.default_rng(0)
  for shape in SHAPES:
    x = jnp.asarray(rng.random(shape, np.float32))
    fns = {}
    for name, cls in VARIANTS.items():
      module = cls(use_running_average=False)
      variables = module.init(jax.random.PRNGKey(0), x)

      def loss(params, x, module=module, variables=variables):
        y, _ = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
        return jnp.sum(jnp.sin(y))
      fns[name] = jax.jit(jax.grad(loss, argnums=(0, 1)))
    grads = {name: jax.block_until_ready(f(variables['params'], x)) for name, f in fns.items()}
    reference = jax.tree_util.tree_leaves(grads['flax.linen.BatchNorm'])
    # The same gradients up to float32 summation order: channel sums of n <= 64 * 32 * 32
    # terms are off by ~sqrt(n) u = 1.5e-5 of their terms' magnitudes, which the three-term
    # gradient's cancellation brings up to the largest gradient's scale: 1e-3 of it is 60x.
    for name, got in grads.items():
      for a, b in zip(jax.tree_util.tree_leaves(got), reference):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-3 * float(jnp.max(jnp.abs(b))),
                                   err_msg=name)
    calls = {name: (lambda i, f=f: jax.block_until_ready(f(variables['params'], x)))
             for name, f in fns.items()}
    ms = ab_rows.median_ms(calls, repeats)
    print(f'{"x".join(map(str, shape)):>12}: '
          + ', '.join(f'{name} {t:.1f} ms' for name, t in ms.items()), flush=True)


def rows(names, repeats: int):
  variants = {name: functools.partial(ab_rows.patched, normalization, 'BatchNorm', cls)
              for name, cls in VARIANTS.items()}  # what layers.batch_norm builds
  ab_rows.time_rows(names, variants, repeats)


def main(_):
  print(f'JAX {jax.__version__} on {jax.default_backend()}; load average '
        f'{" ".join(f"{x:.1f}" for x in os.getloadavg())}')
  if FLAGS.rows:
    rows(FLAGS.rows, FLAGS.repeats)
  else:
    layers_alone(FLAGS.repeats)


if __name__ == '__main__':
  app.run(main)
