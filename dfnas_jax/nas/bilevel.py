"""DARTS's bilevel optimization: the architecture gradient (hypergradient).

The architecture logits alpha minimize the validation loss at the weights
w'(alpha) that one virtual weight step on the training loss would reach:

    min_alpha  L_val(w'(alpha), alpha),   w'(alpha) = w + update(grad_w L_train(w, alpha))

The virtual step `tx` is the reference's (cnn/architect.py): the weight SGD at
its current learning rate, from its momentum buffer, with weight decay and no
gradient clipping, w' = w - lr (momentum * buffer + grad + weight_decay * w).

`hypergradient` returns d L_val / d alpha three ways:
- 'first_order': grad_alpha L_val(w, alpha), ignoring that w depends on alpha.
- 'exact': JAX differentiates through that same virtual step, so the
  second-order term is exact, not approximated.
- 'finite_difference': the reference's approximation, for parity:
  grad_alpha L_val(w', alpha) - lr * (grad_alpha L_train(w+, alpha)
  - grad_alpha L_train(w-, alpha)) / (2 eps), w+- = w +- eps grad_w' L_val,
  eps = r / ||grad_w' L_val||, r = `finite_difference_radius` (the reference's 0.01).

All of it is a pure function of pytrees, usable inside `jax.pmap` (pass
`axis_name`: the weight gradient of the virtual step and the results are
averaged over devices, like the real weight step).

The `darts` stage (dfnas_jax.nas.darts) runs it inside its search step.
"""
from typing import Any, Callable, Optional, Tuple

import jax
import optax

MODES = ('first_order', 'exact', 'finite_difference')

LossFn = Callable[[Any, Any, Any], jax.Array]  # (params, alphas, batch) -> scalar


def virtual_step(loss_fn: LossFn, params, alphas, opt_state, tx: optax.GradientTransformation,
                 batch, axis_name: Optional[str] = None):
  """The weights after one step of `tx` (from its state `opt_state`) on loss_fn(., alphas, batch);
  differentiable in alphas."""
  grads = jax.grad(loss_fn)(params, alphas, batch)
  if axis_name:
    grads = jax.lax.pmean(grads, axis_name)
  updates, _ = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates)


def hypergradient(loss_fn: LossFn, params, alphas, opt_state, tx: optax.GradientTransformation,
                  train_batch, val_batch, *, mode: str = 'exact',
                  learning_rate: Optional[jax.Array] = None,
                  axis_name: Optional[str] = None,
                  finite_difference_radius: float = 0.01) -> Tuple[jax.Array, Any]:
  """(validation loss, its gradient with respect to `alphas`); see the module docstring.

  `learning_rate` (the weight step's current rate) is needed only by 'finite_difference'.
  """
  def mean(tree):
    return jax.lax.pmean(tree, axis_name) if axis_name else tree

  if mode == 'first_order':
    value, grads = jax.value_and_grad(loss_fn, argnums=1)(params, alphas, val_batch)
  elif mode == 'exact':
    def unrolled_val_loss(a):
      w = virtual_step(loss_fn, params, a, opt_state, tx, train_batch, axis_name)
      return loss_fn(w, a, val_batch)
    value, grads = jax.value_and_grad(unrolled_val_loss)(alphas)
  elif mode == 'finite_difference':
    if learning_rate is None:
      raise ValueError("mode='finite_difference' needs the weight step's learning_rate.")
    unrolled = jax.lax.stop_gradient(
        virtual_step(loss_fn, params, alphas, opt_state, tx, train_batch, axis_name))
    value, (dw, grads) = jax.value_and_grad(loss_fn, argnums=(0, 1))(unrolled, alphas, val_batch)
    dw = mean(dw)
    eps = finite_difference_radius / optax.tree.norm(dw)

    def train_alpha_grad(sign):
      w = jax.tree_util.tree_map(lambda p, d: p + sign * eps * d, params, dw)
      return jax.grad(loss_fn, argnums=1)(w, alphas, train_batch)
    plus, minus = train_alpha_grad(1.0), train_alpha_grad(-1.0)
    grads = jax.tree_util.tree_map(lambda g, p, m: g - learning_rate * (p - m) / (2 * eps),
                                   grads, plus, minus)
  else:
    raise ValueError(f'hypergradient mode must be one of {MODES}, got {mode!r}')
  return mean(value), mean(grads)
