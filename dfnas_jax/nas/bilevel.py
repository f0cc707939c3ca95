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

`search_step` is the `darts` stage's step (dfnas_jax.nas.darts): the architecture
step with that hypergradient, then the weight step. It lives here with its optimizers,
with no TensorFlow behind it (benchmarks/compare_torch.py times it).
"""
import functools
from typing import Any, Callable, Optional, Tuple

import flax
import jax
import optax
from clu import metrics

from dfnas_jax.train import state as state_lib
from dfnas_jax.train import steps

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


# --- The search step -------------------------------------------------------------------

AXIS = steps.AXIS


@flax.struct.dataclass
class ArchMetrics(metrics.Collection):
  val_loss: metrics.Average.from_output('val_loss')


def weight_optimizer(config, total_steps: int) -> Tuple[optax.GradientTransformation,
                                                       optax.Schedule]:
  """Reference: SGD momentum 0.9, cosine from learning_rate to learning_rate_min, clipping."""
  lr_fn = optax.cosine_decay_schedule(config.learning_rate, total_steps,
                                      alpha=config.learning_rate_min / config.learning_rate)
  tx = optax.chain(optax.clip_by_global_norm(config.grad_clip),
                   virtual_step_optimizer(config, lr_fn))
  return tx, lr_fn


def virtual_step_optimizer(config, lr_fn: optax.Schedule) -> optax.GradientTransformation:
  """The weight optimizer without its clipping: the hypergradient's virtual step.

  The reference's virtual step (cnn/architect.py) is w - lr (momentum * buffer + grad
  + weight_decay * w) on the unclipped gradient (decay on the kernels here, as in the
  real step). Its state is the weight optimizer's state[1] (the clipping keeps none).
  """
  return state_lib.sgd(lr_fn, config.momentum, config.weight_decay, nesterov=False)


def arch_optimizer(config) -> optax.GradientTransformation:
  """Adam(arch_learning_rate, betas (arch_b1, arch_b2)) with L2 weight decay, as the reference."""
  return optax.chain(optax.add_decayed_weights(config.arch_weight_decay),
                     optax.adam(config.arch_learning_rate, b1=config.arch_b1, b2=config.arch_b2))


def search_step(state: state_lib.SearchState, train_batch, val_batch, teacher_variables=None,
                *, arch_tx: optax.GradientTransformation,
                virtual_tx: optax.GradientTransformation, learning_rate_fn, mode: str,
                loss: str, temperature: float, teacher_apply=None,
                finite_difference_radius: float = 0.01):
  """One architecture step on `val_batch`, then one weight step on `train_batch`.

  `virtual_tx` (`virtual_step_optimizer`) makes the hypergradient's virtual step
  from the weight optimizer's momentum buffer.

  Per device shard, inside `jax.pmap(axis_name=AXIS)`; gradients are averaged
  over devices. The architecture step sees the weights before this step's
  weight update, as in the reference.
  """
  if teacher_apply is not None:
    train_batch = steps.with_teacher_targets(train_batch, teacher_apply, teacher_variables)
    val_batch = steps.with_teacher_targets(val_batch, teacher_apply, teacher_variables)
  w = state.weights

  def loss_fn(params, alphas, batch):
    logits, _ = w.apply_fn({'params': params, 'batch_stats': w.batch_stats}, batch['image'],
                           alphas=alphas, train=True, mutable=['batch_stats'])
    return steps.classification_loss(logits, batch, loss, 0.0, temperature).mean()

  val_loss, arch_grads = hypergradient(
      loss_fn, w.params, state.alphas, w.opt_state[1], virtual_tx, train_batch, val_batch,
      mode=mode, learning_rate=learning_rate_fn(w.step), axis_name=AXIS,
      finite_difference_radius=finite_difference_radius)
  updates, arch_opt_state = arch_tx.update(arch_grads, state.arch_opt_state, state.alphas)
  alphas = optax.apply_updates(state.alphas, updates)

  weights, train_metrics = steps.train_step(
      w, dict(train_batch, alphas=alphas), learning_rate_fn=learning_rate_fn, loss=loss,
      temperature=temperature)
  arch_metrics = ArchMetrics.gather_from_model_output(axis_name=AXIS, val_loss=val_loss)
  return (state_lib.SearchState(weights=weights, alphas=alphas, arch_opt_state=arch_opt_state),
          train_metrics, arch_metrics)


def pmap_search_step(**kwargs):
  return jax.pmap(functools.partial(search_step, **kwargs), axis_name=AXIS,
                  donate_argnums=(0,))


def pmap_config_search_step(config, arch_tx: optax.GradientTransformation,
                            lr_fn: optax.Schedule, teacher_apply=None):
  """`search_step` as the `darts` stage runs it from its config (mode, loss, temperature,
  finite-difference radius; the virtual step from `lr_fn`): pmap-ed, the state donated."""
  return pmap_search_step(arch_tx=arch_tx, virtual_tx=virtual_step_optimizer(config, lr_fn),
                          learning_rate_fn=lr_fn, mode=config.mode, loss=config.loss,
                          temperature=config.temperature, teacher_apply=teacher_apply,
                          finite_difference_radius=config.finite_difference_radius)
