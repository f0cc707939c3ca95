"""Loss terms of teacher inversion (DeepInversion + recursive label calibration).

The BatchNorm-statistics term is captured generically: an interceptor sees the
input of every `nn.BatchNorm` call of any zoo teacher, in forward order, and
compares its batch statistics with that layer's running statistics.
"""
from typing import Callable, List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp


def apply_with_bn_statistics(apply_fn: Callable, variables, images,
                             axis_name: Optional[str] = None) -> Tuple[jax.Array, List]:
  """Teacher logits (inference mode) and, per BatchNorm layer in forward order,
  (batch mean, biased batch var, running mean, running var) of the layer's input.

  With `axis_name` (inside `pmap`, equal shards per device) the batch statistics
  are those of the whole batch across the devices of that axis.
  """
  stats = []
  inside = []  # the BatchNorm call under way: a subclass' __call__ that calls nn.BatchNorm's
  # (models/normalization.py) is one layer, seen once

  def interceptor(next_fun, args, kwargs, context):
    if (isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__'
        and not inside):
      x = args[0].astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))  # (N, H, W)
      mean = x.mean(axes)
      var = jnp.mean(jnp.square(x - mean), axes)
      if axis_name is not None:
        # E[x^2] - E[x]^2 of the whole batch, combined from the shards' centred moments
        # (no cancellation; on one device exactly the shard's own statistics).
        global_mean = jax.lax.pmean(mean, axis_name)
        var = jax.lax.pmean(var + jnp.square(mean - global_mean), axis_name)
        mean = global_mean
      stats.append((mean, var, context.module.get_variable('batch_stats', 'mean'),
                    context.module.get_variable('batch_stats', 'var')))
      inside.append(context.module)
      try:
        return next_fun(*args, **kwargs)
      finally:
        inside.pop()
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


def total_variation(x, axis_name: Optional[str] = None) -> Tuple[jax.Array, jax.Array]:
  """(TV_l1, TV_l2) over horizontal, vertical and both diagonal neighbour differences.

  TV_l2 sums norms over the whole batch; with `axis_name`, over all its devices' shards.
  """
  diffs = [x[:, :, :-1] - x[:, :, 1:], x[:, :-1, :] - x[:, 1:, :],
           x[:, 1:, :-1] - x[:, :-1, 1:], x[:, :-1, :-1] - x[:, 1:, 1:]]
  tv_l1 = sum(jnp.mean(jnp.abs(d)) for d in diffs)
  if axis_name is None:
    tv_l2 = sum(jnp.linalg.norm(d.ravel()) for d in diffs)
  else:
    tv_l2 = sum(jnp.sqrt(jax.lax.psum(jnp.sum(jnp.square(d)), axis_name)) for d in diffs)
  return tv_l1, tv_l2


def image_l2(x) -> jax.Array:
  """Mean over the batch of each image's L2 norm."""
  return jnp.mean(jnp.linalg.norm(x.reshape(x.shape[0], -1), axis=-1))


def soft_cross_entropy(logits, targets) -> jax.Array:
  """Mean over the batch of -sum_c targets_c log softmax(logits)_c (targets: probabilities)."""
  return jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))
