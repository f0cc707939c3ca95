"""What a flax model runs and holds, counted from shapes alone (jax.eval_shape: nothing is
compiled). The analytic-cost tests of the search spaces compare against these."""
import flax.linen as nn
import jax
import jax.numpy as jnp


def shapes(model, size, **kwargs):
  """The variables `model.init` makes for one size x size RGB image, as shapes."""
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)),
                                           **kwargs))


def num_params(variables):
  return sum(x.size for x in jax.tree_util.tree_leaves(variables['params']))


def multiply_adds(model, variables, size, layer_types):
  """Multiply-adds of every `layer_types` layer (each with a 'kernel') `model` really runs."""
  total = []

  def count(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and isinstance(context.module, layer_types):
      kernel = context.module.variables['params']['kernel']
      total.append(kernel.size * (out.shape[1] * out.shape[2] if out.ndim == 4 else 1))
    return out

  def run(variables):
    with nn.intercept_methods(count):
      model.apply(variables, jnp.zeros((1, size, size, 3)))
  jax.eval_shape(run, variables)
  return sum(total)
