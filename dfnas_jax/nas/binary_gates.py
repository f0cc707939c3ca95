"""ProxylessNAS's binary gates, its weight and architecture steps and their optimizers
(Cai et al., 2019): the pure-JAX half of stage `proxylessnas` (nas/proxyless.py), with no
TensorFlow behind it (benchmarks/compare_torch.py times these steps).

An architecture step samples, per layer, an active candidate (`binary_mode='full'`: from
softmax(alpha) over all candidates, every candidate is computed; `'two'`: two candidates
are drawn, then the active one among them, only those two are computed). The layer's output
is sum_j g_j o_j(x) with one-hot gates g, and the gradient of the loss L with respect to the
logits is estimated from the gates' gradient,

  dL/dalpha_i = sum_j dL/dg_j p_j (delta_ij - p_i) = p_i (dL/dg_i - sum_j p_j dL/dg_j),

over the involved candidates. See nas/proxyless.py for the 'two' mode's details.
"""
import dataclasses
import functools
import os
from typing import Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics

from dfnas_jax.models import layers
from dfnas_jax.models import proxyless as space_lib
from dfnas_jax.nas import latency
from dfnas_jax.train import state as state_lib
from dfnas_jax.train import steps

AXIS = steps.AXIS
BINARY_MODES = ('two', 'full')
COST_LOSSES = ('mul_log', 'add_linear')


# --- The architecture distribution ---------------------------------------------------

def probabilities(alphas, allowed):
  """Per-layer softmax over the candidates a layer may choose."""
  return jax.nn.softmax(jnp.where(allowed, alphas, -jnp.inf), axis=-1)


def sample_path(key, alphas, allowed):
  """One candidate per layer, drawn from `probabilities`: [L] int32."""
  return jax.random.categorical(key, jnp.where(allowed, alphas, -jnp.inf)).astype(jnp.int32)


def binarize(key, alphas, allowed, mode: str) -> Tuple[Optional[jax.Array], jax.Array]:
  """(paths [L, 2] | None, one-hot gates [L, K]) of an architecture step.

  'full': gates over all candidates (paths None), the active one drawn from the
  probabilities. 'two': two distinct candidates drawn from the probabilities,
  then the active one from their renormalized probabilities.
  """
  if mode == 'full':
    return None, jax.nn.one_hot(sample_path(key, alphas, allowed), alphas.shape[-1])
  pair_key, active_key = jax.random.split(key)
  probs = probabilities(alphas, allowed)
  draw = lambda k, p: jax.random.choice(k, p.shape[-1], (2,), replace=False, p=p)
  paths = jax.vmap(draw)(jax.random.split(pair_key, alphas.shape[0]), probs)
  active = jax.random.categorical(active_key, jnp.take_along_axis(alphas, paths, axis=-1))
  return paths.astype(jnp.int32), jax.nn.one_hot(active, 2)


def gate_gradient_to_alphas(gate_grads, alphas, allowed, paths=None):
  """The binary-gate estimator: dL/dalpha_i = p_i (dL/dg_i - sum_j p_j dL/dg_j).

  `gate_grads` [L, K] are over all candidates (`paths` None) or over `paths`
  [L, K], whose probabilities are renormalized among themselves.
  """
  if paths is None:
    p = probabilities(alphas, allowed)
    return p * (gate_grads - jnp.sum(p * gate_grads, -1, keepdims=True))
  p = jax.nn.softmax(jnp.take_along_axis(alphas, paths, axis=-1), axis=-1)
  grads = p * (gate_grads - jnp.sum(p * gate_grads, -1, keepdims=True))
  rows = jnp.arange(alphas.shape[0])[:, None]
  return jnp.zeros_like(alphas).at[rows, paths].add(grads)


def pair_probabilities(alphas, paths):
  """[L, K]: the drawn pairs' probabilities renormalized between them, 0 elsewhere."""
  rows = jnp.arange(alphas.shape[0])[:, None]
  return jnp.zeros_like(alphas).at[rows, paths].set(
      jax.nn.softmax(alphas[rows, paths], axis=-1))


def zero_active(gates, paths):
  """[L] bool: the layers whose active candidate of the pair is 'zero'."""
  active = jnp.take_along_axis(paths, jnp.argmax(gates, -1)[:, None], axis=-1)[:, 0]
  return active == space_lib.ZERO


def rescale_involved(new_alphas, old_alphas, paths):
  """Shifts each layer's updated logits of `paths` back to their old logsumexp."""
  rows = jnp.arange(new_alphas.shape[0])[:, None]
  offset = (jax.nn.logsumexp(new_alphas[rows, paths], axis=-1)
            - jax.nn.logsumexp(old_alphas[rows, paths], axis=-1))
  return new_alphas.at[rows, paths].add(-offset[:, None])


@dataclasses.dataclass(frozen=True)
class CostLoss:
  """Combines the task loss with E[cost] (reference forms and defaults).

  mul_log:    alpha * loss * (log E[cost] / log target) ** beta
  add_linear: loss + lam * (E[cost] - target) / target
  None form:  the task loss alone.
  """
  form: Optional[str]
  target: float = 1.0
  alpha: float = 0.2
  beta: float = 0.3
  lam: float = 0.1

  def __call__(self, loss, expected_cost):
    if self.form is None:
      return loss
    if self.form == 'mul_log':
      return self.alpha * loss * (jnp.log(expected_cost) / jnp.log(self.target)) ** self.beta
    if self.form == 'add_linear':
      return loss + self.lam * (expected_cost - self.target) / self.target
    raise ValueError(f'cost_loss must be one of {COST_LOSSES}, got {self.form!r}')


def architecture_gradient(task_loss_fn, gates, paths, alphas, allowed, cost: latency.CostTable,
                          cost_loss: CostLoss, axis_name: Optional[str] = None):
  """(total loss, task loss, E[cost], dtotal/dalpha) with one-hot `gates` over `paths`.

  `task_loss_fn(gates)` is the loss of the network run with those gates. The
  gates' gradient goes through the binary-gate estimator; E[cost] adds its exact
  gradient. With `paths`, E[cost] is over the pairs and layers whose active
  candidate is zero get a zero gradient (the reference sets theirs to None).
  """
  def total(gates, alphas):
    task = task_loss_fn(gates)
    probs = probabilities(alphas, allowed) if paths is None else pair_probabilities(alphas, paths)
    expected = cost.expected(probs)
    return cost_loss(task, expected), (task, expected)

  (value, (task, expected)), (gate_grads, direct) = jax.value_and_grad(
      total, argnums=(0, 1), has_aux=True)(gates, alphas)
  if axis_name is not None:
    gate_grads, direct = jax.lax.pmean((gate_grads, direct), axis_name)
  grads = direct + gate_gradient_to_alphas(gate_grads, alphas, allowed, paths)
  if paths is not None:
    grads = jnp.where(zero_active(gates, paths)[:, None], 0.0, grads)
  return value, task, expected, grads


# --- Steps ---------------------------------------------------------------------------

@flax.struct.dataclass
class ArchMetrics(metrics.Collection):
  arch_loss: metrics.Average.from_output('arch_loss')
  val_loss: metrics.Average.from_output('val_loss')
  expected_cost: metrics.LastValue.from_output('expected_cost')


def weight_step(state: state_lib.SearchState, batch, teacher_variables=None, *, seed: int,
                allowed, **train_kwargs):
  """`steps.train_step` on one path drawn from the architecture, keyed by (seed, step);
  the candidates off the path keep their parameters and momentum."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), state.weights.step)
  path = sample_path(key, state.alphas, allowed)
  weights, m = steps.train_step(state.weights, dict(batch, arch=path), teacher_variables,
                                after_update=layers.keep_unused_choices, **train_kwargs)
  return state.replace(weights=weights), m


def arch_step(state: state_lib.SearchState, batch, teacher_variables=None, *, seed: int, allowed,
              mode: str, arch_tx: optax.GradientTransformation, cost: latency.CostTable,
              cost_loss: CostLoss, loss: str, temperature: float, teacher_apply=None):
  """One architecture update on a held-out batch, with binary gates keyed by (seed, step).

  `arch_tx` is `layerwise`: in 'two' mode, layers whose active candidate is zero skip it.
  """
  if teacher_apply is not None:
    batch = steps.with_teacher_targets(batch, teacher_apply, teacher_variables)
  key = jax.random.fold_in(jax.random.PRNGKey(seed + 1), state.weights.step)
  paths, gates = binarize(key, state.alphas, allowed, mode)
  w = state.weights

  def task_loss(gates):  # BN in training mode; its statistics are not updated here
    logits, _ = w.apply_fn(w.variables, batch['image'], gates=gates, paths=paths, train=True,
                           mutable=['batch_stats'])
    return steps.classification_loss(logits, batch, loss, 0.0, temperature).mean()

  value, task, expected, grads = architecture_gradient(
      task_loss, gates, paths, state.alphas, allowed, cost, cost_loss, axis_name=AXIS)
  skip = None if paths is None else zero_active(gates, paths)
  updates, arch_opt_state = arch_tx.update(grads, state.arch_opt_state, state.alphas, skip=skip)
  alphas = optax.apply_updates(state.alphas, updates)
  if paths is not None:
    alphas = rescale_involved(alphas, state.alphas, paths)
  m = ArchMetrics.gather_from_model_output(axis_name=AXIS, arch_loss=value, val_loss=task,
                                           expected_cost=expected)
  return state.replace(alphas=alphas, arch_opt_state=arch_opt_state), m


def layerwise(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`tx` on each row of the [L, K] logits as a parameter of its own.

  As torch.optim does with the reference's per-layer logits: every layer has its
  own state (Adam's step count included), and `update(..., skip=[L] bool)` leaves
  a skipped layer's logits and state as they were, like a parameter whose grad is None.
  """
  def update(grads, state, params=None, skip=None, **extra_args):
    del extra_args
    updates, new_state = jax.vmap(tx.update)(grads, state, params)
    if skip is None:
      return updates, new_state
    keep = lambda old, new: jnp.where(skip.reshape(skip.shape + (1,) * (new.ndim - 1)), old, new)
    return jnp.where(skip[:, None], 0.0, updates), jax.tree_util.tree_map(keep, state, new_state)

  return optax.GradientTransformationExtraArgs(jax.vmap(tx.init), update)


def arch_optimizer(config) -> optax.GradientTransformationExtraArgs:
  """Reference: Adam(1e-3, betas (0, 0.999), eps 1e-8) per layer, no weight decay by default."""
  return layerwise(optax.chain(optax.add_decayed_weights(config.arch_weight_decay),
                               optax.adam(config.arch_learning_rate, b1=config.arch_b1,
                                          b2=config.arch_b2, eps=1e-8)))


def weight_schedule(config, warmup_steps: int, search_steps: int) -> optax.Schedule:
  """Cosine over the warm-up from `warmup_learning_rate` (<= 0: `learning_rate`), then
  a fresh cosine from `learning_rate` over the search (reference)."""
  search = optax.cosine_decay_schedule(config.learning_rate, search_steps)
  if not warmup_steps:
    return search
  peak = config.warmup_learning_rate if config.warmup_learning_rate > 0 else config.learning_rate
  return optax.join_schedules(
      [optax.cosine_decay_schedule(peak, warmup_steps), search], [warmup_steps])


def weight_optimizer(config, lr_fn: optax.Schedule) -> optax.GradientTransformation:
  """Nesterov SGD; weight decay on kernels only, or on every parameter (reference)."""
  if not config.decay_all_weights:
    return state_lib.sgd(lr_fn, config.momentum, config.weight_decay, config.nesterov)
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(lr_fn, momentum=config.momentum, nesterov=config.nesterov))


def pmap_weight_step(config, allowed, learning_rate_fn: optax.Schedule, teacher_apply=None):
  """`weight_step` as the search runs it: pmap-ed, the state donated."""
  return jax.pmap(functools.partial(
      weight_step, seed=config.seed, allowed=allowed, learning_rate_fn=learning_rate_fn,
      loss=config.loss, temperature=config.temperature, teacher_apply=teacher_apply,
      dropout_rng=jax.random.PRNGKey(config.seed + 2)), axis_name=steps.AXIS, donate_argnums=(0,))


def pmap_arch_step(config, allowed, arch_tx: optax.GradientTransformation,
                   cost: latency.CostTable, cost_loss: CostLoss, teacher_apply=None):
  """`arch_step` as the search runs it: pmap-ed, the state donated."""
  return jax.pmap(functools.partial(
      arch_step, seed=config.seed, allowed=allowed, mode=config.binary_mode, arch_tx=arch_tx,
      cost=cost, cost_loss=cost_loss, loss=config.loss, temperature=config.temperature,
      teacher_apply=teacher_apply), axis_name=steps.AXIS, donate_argnums=(0,))


def arch_steps_until(config, warmup_steps: int, steps_per_epoch: int, step: int) -> int:
  """Architecture steps (= validation batches) in steps 1..step: every
  `arch_update_every` weight steps, from `arch_start_epoch` search epochs on."""
  first = warmup_steps + config.arch_start_epoch * steps_per_epoch
  return max(0, step - first) // config.arch_update_every


def cost_setup(config, space: space_lib.SearchSpace, num_classes: int,
               workdir: str) -> Tuple[latency.CostTable, CostLoss]:
  """The cost table and the loss that uses it; the target resolved against the table."""
  if config.cost_model == 'none':
    table = latency.flops_table(space, num_classes)  # reported, not optimized
    return table, CostLoss(None)
  table = latency.cost_table(config.cost_model, space, num_classes, config.latency_batch_size,
                             config.latency_cache or os.path.join(workdir, 'latency_table.json'),
                             config.latency_repeats)
  target = config.cost_target
  if target <= 0:  # relative to the uniform distribution's expected cost
    uniform = probabilities(jnp.zeros(table.table.shape), space.allowed())
    target = config.cost_target_fraction * float(table.expected(uniform))
  if config.cost_loss == 'mul_log' and target <= 1:
    raise ValueError(f'cost_loss=mul_log needs a cost target above 1 {table.unit} (log ratio); '
                     f'got {target:.3g}. Use add_linear, or a larger latency_batch_size.')
  return table, CostLoss(config.cost_loss, target, config.mul_log_alpha, config.mul_log_beta,
                         config.add_linear_lambda)
