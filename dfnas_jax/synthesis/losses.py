"""Loss terms of teacher inversion (DeepInversion + recursive label calibration).

The BatchNorm-statistics term is captured generically: an interceptor sees the
input of every `nn.BatchNorm` call of any zoo teacher, in forward order, and
compares its batch statistics with that layer's running statistics.
"""
from typing import Callable, List, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp


def apply_with_bn_statistics(apply_fn: Callable, variables, images) -> Tuple[jax.Array, List]:
  """Teacher logits (inference mode) and, per BatchNorm layer in forward order,
  (batch mean, biased batch var, running mean, running var) of the layer's input."""
  stats = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
      x = args[0].astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))  # (N, H, W)
      mean = x.mean(axes)
      var = jnp.mean(jnp.square(x - mean), axes)
      stats.append((mean, var, context.module.get_variable('batch_stats', 'mean'),
                    context.module.get_variable('batch_stats', 'var')))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    logits = apply_fn(variables, images, train=False)
  return logits, stats


def bn_statistics_loss(stats, first_bn_multiplier: float) -> jax.Array:
  """sum_l w_l (||running_var - batch_var||_2 + ||running_mean - batch_mean||_2)."""
  if not stats:
    raise ValueError('The teacher has no BatchNorm layers: the BN-statistics loss needs them '
                     '(set bn_weight=0 to synthesize without it).')
  terms = [jnp.linalg.norm(rv - v) + jnp.linalg.norm(rm - m) for m, v, rm, rv in stats]
  return first_bn_multiplier * terms[0] + sum(terms[1:])


def total_variation(x) -> Tuple[jax.Array, jax.Array]:
  """(TV_l1, TV_l2) over horizontal, vertical and both diagonal neighbour differences."""
  diffs = [x[:, :, :-1] - x[:, :, 1:], x[:, :-1, :] - x[:, 1:, :],
           x[:, 1:, :-1] - x[:, :-1, 1:], x[:, :-1, :-1] - x[:, 1:, 1:]]
  tv_l1 = sum(jnp.mean(jnp.abs(d)) for d in diffs)
  tv_l2 = sum(jnp.linalg.norm(d.ravel()) for d in diffs)
  return tv_l1, tv_l2


def image_l2(x) -> jax.Array:
  """Mean over the batch of each image's L2 norm."""
  return jnp.mean(jnp.linalg.norm(x.reshape(x.shape[0], -1), axis=-1))


def soft_cross_entropy(logits, targets) -> jax.Array:
  """Mean over the batch of -sum_c targets_c log softmax(logits)_c (targets: probabilities)."""
  return jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))
