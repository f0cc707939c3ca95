"""models/normalization.BatchNorm: nn.BatchNorm's values, statistics and gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfnas_jax.models import layers, normalization


def _apply(module_cls, affine, axis_name, dtype, variables, x, g):
  """Loss <y, g> on one shard, its gradients (x, params) and the updated statistics."""
  module = module_cls(use_running_average=False, momentum=0.9, use_scale=affine,
                      use_bias=affine, axis_name=axis_name, dtype=dtype)

  def loss(params, x):
    y, updates = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
    assert y.dtype == dtype
    return (y.astype(jnp.float32) * g).sum(), updates['batch_stats']

  (value, stats), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
      variables.get('params', {}), x)
  # A second derivative, as DARTS' exact hypergradient takes one through every BatchNorm.
  second = jax.grad(lambda x: (jax.grad(lambda x: loss(variables.get('params', {}), x)[0])(x)
                               ** 2).sum())(x)
  return value, stats, grads, second


@pytest.mark.parametrize('affine,shards,dtype', [(True, 1, jnp.float32), (False, 2, jnp.float32),
                                                 (True, 2, jnp.bfloat16)])
def test_batch_norm_matches_flax(affine, shards, dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(1.0, 2.0, (shards, 4, 3, 3, 5)), dtype)
  g = jnp.asarray(rng.normal(size=(shards, 4, 3, 3, 5)), jnp.float32)
  variables = nn.BatchNorm(use_scale=affine, use_bias=affine).init(jax.random.PRNGKey(0),
                                                                   x[0], use_running_average=False)
  if affine:  # not the initial ones and zeros
    variables['params'] = {'scale': jnp.asarray(rng.normal(1, 0.3, 5), jnp.float32),
                           'bias': jnp.asarray(rng.normal(0, 0.3, 5), jnp.float32)}
  variables['batch_stats'] = {'mean': jnp.asarray(rng.normal(size=5), jnp.float32),
                              'var': jnp.asarray(rng.random(5) + 0.5, jnp.float32)}
  axis_name = 'batch' if shards > 1 else None
  results = {}
  for cls in (nn.BatchNorm, normalization.BatchNorm):
    run = lambda x, g, cls=cls: _apply(cls, affine, axis_name, dtype, variables, x, g)  # noqa: E731
    results[cls] = (jax.vmap(run, axis_name=axis_name) if axis_name else
                    jax.vmap(run))(x, g)
  got, want = results[normalization.BatchNorm], results[nn.BatchNorm]
  tol = 1e-2 if dtype == jnp.bfloat16 else 1e-5
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    assert a.shape == b.shape and a.dtype == b.dtype
    scale = float(jnp.max(jnp.abs(b.astype(jnp.float32)))) or 1.0
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=tol, atol=tol * scale)
  assert len(jax.tree_util.tree_leaves(got)) == (7 if affine else 5)


@pytest.mark.parametrize('shards', [1, 2])
def test_statistics_outputs_have_their_gradients_too(shards):
  """BatchNorm stops them; batch_norm_train alone is differentiable in all three outputs."""
  rng = np.random.default_rng(1)
  x, g = (jnp.asarray(rng.normal(1.0, 2.0, (shards, 4, 2, 2, 3)), jnp.float32) for _ in range(2))
  weights = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
  axis_name = 'batch' if shards > 1 else None
  scale, bias = jnp.asarray([0.5, 1.0, 2.0]), jnp.asarray([0.1, 0.0, -0.3])

  def reference(x, scale, bias):
    mean, mean_sq = x.mean((0, 1, 2)), jnp.square(x).mean((0, 1, 2))
    if axis_name:
      mean, mean_sq = jax.lax.pmean((mean, mean_sq), axis_name)
    var = jnp.maximum(0.0, mean_sq - jnp.square(mean))
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias, mean, var

  def loss(fn, x, g, scale, bias):
    y, mean, var = fn(x, scale, bias)
    return (y * g).sum() + (weights[0] * mean).sum() + (weights[1] * var).sum()

  custom = lambda x, s, b: normalization.batch_norm_train(  # noqa: E731
      x, s, b, 1e-5, axis_name, jnp.dtype(jnp.float32))
  grads = {}
  for name, fn in (('custom', custom), ('reference', reference)):
    grad = jax.grad(lambda x, g, s, b, fn=fn: loss(fn, x, g, s, b), (0, 2, 3))
    grads[name] = jax.vmap(grad, (0, 0, None, None), axis_name=axis_name)(x, g, scale, bias)
  for a, b in zip(grads['custom'], grads['reference']):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_networks_use_it_and_hooks_still_see_a_flax_batch_norm():
  norm = layers.batch_norm(True, 0.9, 'batch', jnp.float32)(name='bn')
  assert type(norm) is normalization.BatchNorm and isinstance(norm, nn.BatchNorm)
  # Running statistics and initialization are flax's own code path.
  x = jnp.ones((2, 3, 3, 4))
  variables = layers.batch_norm(False, 0.9, None, jnp.float32)().init(jax.random.PRNGKey(0), x)
  assert set(variables) == {'params', 'batch_stats'}
