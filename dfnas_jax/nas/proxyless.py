"""Stage `proxylessnas`: data-free ProxylessNAS, path-binarized and hardware-aware.

  synthesize (or reuse)  ->  split: weights / architecture validation
  -> cost table (latency measured on this backend, cached; or FLOPs)
  -> warm-up: weight steps on paths sampled from the (uniform) architecture
  -> search: a weight step on one sampled path every step; every
     `arch_update_every` steps an architecture step on binary gates
  -> the argmax architecture (JSON with its latency and FLOPs) -> retrain -> evaluate

Binary gates (Cai et al., 2019): an architecture step samples, per layer, an
active candidate (`binary_mode='full'`: from softmax(alpha) over all candidates,
every candidate is computed; `'two'`: two candidates are drawn, then the active
one among them, only those two are computed). The layer's output is
sum_j g_j o_j(x) with one-hot gates g, and the gradient of the loss L with
respect to the logits is estimated from the gates' gradient,

  dL/dalpha_i = sum_j dL/dg_j p_j (delta_ij - p_i) = p_i (dL/dg_i - sum_j p_j dL/dg_j),

over the involved candidates. The hardware term E[cost] = sum_l sum_i p_li cost_li
is differentiable in alpha directly. 'two' mode follows the reference's
MixedEdge: both p in the estimator and p in E[cost] are the drawn pair's
probabilities renormalized between them (0 for the others), so neither term
reaches an undrawn candidate; a layer whose active candidate is 'zero' gets no
gradient at all; after the step the pair's logits are shifted back to their old
logsumexp, so undrawn candidates keep their logits and probabilities. Each
layer's logits are a parameter of their own for Adam (`layerwise`).

Sampling happens inside the compiled steps, keyed by (seed, step): one compile
serves every path, and a resumed run draws the same paths.
"""
import dataclasses
import functools
import os
import time
from typing import Any, Dict, Optional, Tuple

import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics

from dfnas_jax import models, plots
from dfnas_jax import workdir as wd
from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.models import layers
from dfnas_jax.models import proxyless as space_lib
from dfnas_jax.nas import latency, retraining, search_data, search_loop, subnets
from dfnas_jax.train import loop, retrain, steps, trainer
from dfnas_jax.train import state as state_lib

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


def weight_step(state: search_loop.SearchState, batch, teacher_variables=None, *, seed: int,
                allowed, **train_kwargs):
  """`steps.train_step` on one path drawn from the architecture, keyed by (seed, step);
  the candidates off the path keep their parameters and momentum."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), state.weights.step)
  path = sample_path(key, state.alphas, allowed)
  weights, m = steps.train_step(state.weights, dict(batch, arch=path), teacher_variables,
                                after_update=layers.keep_unused_choices, **train_kwargs)
  return state.replace(weights=weights), m


def arch_step(state: search_loop.SearchState, batch, teacher_variables=None, *, seed: int, allowed,
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


def check_config(config) -> None:
  checks = {'binary_mode': (config.binary_mode, BINARY_MODES),
            'cost_model': (config.cost_model, latency.KINDS + ('none',)),
            'cost_loss': (config.cost_loss, COST_LOSSES),
            'loss': (config.loss, ('distillation', 'cross_entropy'))}
  for field, (value, allowed) in checks.items():
    if value not in allowed:
      raise ValueError(f'proxylessnas {field} must be one of {allowed}, got {value!r}')
  if config.space not in space_lib.SPACES:
    raise ValueError(f'proxylessnas space must be one of {sorted(space_lib.SPACES)}, '
                     f'got {config.space!r}')
  if config.arch_update_every < 1:
    raise ValueError(f'arch_update_every must be >= 1, got {config.arch_update_every}')
  if config.num_epochs < 1 or config.warmup_epochs < 0:
    raise ValueError(f'Need num_epochs >= 1 and warmup_epochs >= 0, got {config.num_epochs} '
                     f'and {config.warmup_epochs}')
  if not 0 <= config.arch_start_epoch < config.num_epochs:
    raise ValueError(f'arch_start_epoch must be in [0, num_epochs={config.num_epochs}), '
                     f'got {config.arch_start_epoch}')
  retrain.check_soft_labels(config)
  models.compute_dtype(config.compute_dtype)  # a bad name fails before any work
  search_data.check_search_data(config, config.loss, config.augment,
                                space_lib.SPACES[config.space].image_size, config.val_per_class)
  retraining.retrain_data(config)


# --- The search ----------------------------------------------------------------------

def write_epoch_files(directory: str, epoch: int, probs: np.ndarray, space_name: str) -> None:
  if jax.process_index() == 0:
    plots.architecture_heatmap(
        {space_name: probs}, [f'layer {i}' for i in range(probs.shape[0])],
        space_lib.CANDIDATES, os.path.join(directory, 'probabilities.png'),
        title=f'architecture probabilities after epoch {epoch}')


def search(config, workdir: str, train_source: ip.DataSource, val_source: ip.DataSource,
           teacher: Optional[Tuple[Any, Any]], cost: latency.CostTable,
           cost_loss: CostLoss) -> Dict[str, Any]:
  """Warm-up and search; resumes from workdir/checkpoints. Returns alphas and curves."""
  space = space_lib.SPACES[config.space]
  allowed = space.allowed()
  steps_per_epoch = ip.steps_per_epoch(train_source, config.batch_size)
  warmup_steps = config.warmup_epochs * steps_per_epoch
  num_steps = warmup_steps + config.num_epochs * steps_per_epoch
  lr_fn = weight_schedule(config, warmup_steps, num_steps - warmup_steps)
  tx = weight_optimizer(config, lr_fn)
  arch_tx = arch_optimizer(config)
  model = space_lib.ProxylessNet(space, train_source.num_classes, dropout=config.dropout,
                                 dtype=models.compute_dtype(config.compute_dtype),
                                 bn_epsilon=config.bn_epsilon)
  weight_rng, alpha_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  alphas = config.arch_init_std * jax.random.normal(alpha_rng, allowed.shape)
  state = search_loop.SearchState(
      weights=state_lib.create_train_state(model, weight_rng, space.image_size, tx),
      alphas=alphas, arch_opt_state=arch_tx.init(alphas))
  mngr, state, start_step, history = search_loop.restore(workdir, config, state, num_steps)
  runner = loop.Loop(workdir, start_step, num_steps)

  arch_steps = functools.partial(arch_steps_until, config, warmup_steps, steps_per_epoch)

  teacher_apply = teacher and teacher[0].apply
  extra_args = (steps.replicate(teacher[1]),) if teacher else ()
  p_weight_step = jax.pmap(functools.partial(
      weight_step, seed=config.seed, allowed=allowed, learning_rate_fn=lr_fn, loss=config.loss,
      temperature=config.temperature, teacher_apply=teacher_apply,
      dropout_rng=jax.random.PRNGKey(config.seed + 2)), axis_name=AXIS, donate_argnums=(0,))
  p_arch_step = jax.pmap(functools.partial(
      arch_step, seed=config.seed, allowed=allowed, mode=config.binary_mode, arch_tx=arch_tx,
      cost=cost, cost_loss=cost_loss, loss=config.loss, temperature=config.temperature,
      teacher_apply=teacher_apply), axis_name=AXIS, donate_argnums=(0,))

  def batches(source, seed, start):
    return flax.jax_utils.prefetch_to_device(
        ip.train_batches(source, config.batch_size, space.image_size, config.augment, seed,
                         start_step=start), 2)
  train_data = batches(train_source, config.seed, start_step)
  val_data = batches(val_source, config.seed + 1, arch_steps(start_step))
  # Each epoch scores the argmax architecture on the held-out split with BN
  # statistics recalibrated for it: the running ones mix every sampled path.
  calibration = ip.train_batches(train_source, config.batch_size, space.image_size,
                                 config.augment, config.seed + 3)
  evaluator = subnets.SubnetEvaluator(
      model, state.weights.variables,
      [next(calibration) for _ in range(config.calibration_batches)],
      list(ip.eval_batches(val_source, config.batch_size, space.image_size, config.augment)))

  def step_fn(rstate, step):
    rstate, weight_m = p_weight_step(rstate, next(train_data), *extra_args)
    arch_m = None
    if arch_steps(step) > arch_steps(step - 1):
      rstate, arch_m = p_arch_step(rstate, next(val_data), *extra_args)
    return rstate, {'train_': weight_m, '': arch_m}

  def epoch_end(step, epoch, rstate, scalars):
    alphas = np.asarray(jax.device_get(flax.jax_utils.unreplicate(rstate.alphas)))
    probs = np.asarray(probabilities(alphas, allowed))
    choices = derive(alphas, allowed)
    with runner.report.timed('eval'):
      evaluator.set_variables(rstate.weights.variables)
      scalars['argmax_val_accuracy'] = evaluator(choices)
    scalars['expected_cost'] = float(cost.expected(probs))
    logs = np.log(np.where(probs > 0, probs, 1.0))  # disallowed choices have p = 0
    scalars['entropy'] = float(-np.sum(probs * logs) / probs.shape[0])  # nats per layer
    write_epoch_files(workdir, epoch, probs, config.space)
    history.append({'epoch': epoch, 'step': step,
                    'phase': 'warmup' if step <= warmup_steps else 'search', **scalars,
                    'argmax': list(choices)})
    logging.info('Epoch %d: %s, argmax %s', epoch, scalars,
                 space_lib.architecture_name(config.space, choices))

  final = search_loop.run(runner, state, step_fn, config=config, mngr=mngr,
                          workdir=workdir, history=history, steps_per_epoch=steps_per_epoch,
                          on_epoch_end=epoch_end)
  return {'alphas': np.asarray(final.alphas), 'history': history, 'num_steps': num_steps,
          'warmup_steps': warmup_steps, 'arch_steps': arch_steps(num_steps),
          'steps_per_epoch': steps_per_epoch, 'wall_time_s': runner.stopwatch.seconds()}


def derive(alphas, allowed) -> Tuple[int, ...]:
  """The most probable candidate of every layer."""
  return tuple(int(c) for c in np.argmax(np.where(allowed, alphas, -np.inf), axis=-1))


def run(config: ml_collections.ConfigDict, workdir: str):
  check_config(config)
  retraining.check_real_data(config)
  data = search_data.load(config, workdir, per_class=config.val_per_class)
  phase_times = {'data_s': data.seconds}
  train_source, val_source = data.train, data.val
  num_classes = train_source.num_classes
  teacher = retrain.distillation_teacher(config.loss, config)
  space = space_lib.SPACES[config.space]
  trainer.require_soft_labels(config.loss, teacher, train_source, config.augment,
                              space.image_size)

  t = time.time()
  cost, cost_loss = cost_setup(config, space, num_classes, workdir)
  phase_times['cost_table_s'] = time.time() - t
  if jax.process_index() == 0:
    wd.write_json(os.path.join(workdir, 'cost_table.json'),
                  {**cost.to_json(), 'loss': cost_loss.form, 'target': cost_loss.target})
  logging.info('Cost model %s (%s): fixed %.3g, candidates %.3g..%.3g; loss %s, target %.4g',
               cost.kind, cost.unit, cost.fixed, cost.table[space.allowed()].min(),
               cost.table.max(), cost_loss.form, cost_loss.target)

  result = search(config, os.path.join(workdir, 'search'), train_source, val_source, teacher,
                  cost, cost_loss)
  phase_times['search_s'] = result['wall_time_s']

  choices = derive(result['alphas'], space.allowed())
  name = space_lib.architecture_name(config.space, choices)
  flops, params = space_lib.cost(space, choices, num_classes)
  probs = np.asarray(probabilities(result['alphas'], space.allowed()))
  found = {
      'architecture': name, 'choices': list(choices),
      'candidates': [space_lib.CANDIDATES[c] for c in choices],
      'flops_m': flops / 1e6, 'params': params,
      'cost_model': cost.kind, 'cost_unit': cost.unit, 'cost_of_architecture': cost.of(choices),
      'expected_cost': float(cost.expected(probs)), 'cost_target': cost_loss.target,
      'measured_latency_ms': latency.time_forward(
          space_lib.ProxylessNet(space, num_classes, choices, axis_name=None),
          (config.latency_batch_size, space.image_size, space.image_size, 3),
          config.latency_repeats),
      'latency_batch_size': config.latency_batch_size, 'backend': latency.backend_key(),
      'probabilities': probs.tolist(),
  }
  if jax.process_index() == 0:
    wd.write_json(os.path.join(workdir, 'architecture.json'), found)
  logging.info('Found %s: %.2f MFLOPs, %d params, %.3g %s by the table, %.3g ms measured',
               name, found['flops_m'], params, found['cost_of_architecture'], cost.unit,
               found['measured_latency_ms'])

  final = retraining.retrain_architecture(config, name, data, config.loss,
                                          os.path.join(workdir, 'retrain'))

  last = result['history'][-1] if result['history'] else {}
  summary = {
      'stage': 'proxylessnas', 'space': config.space, 'binary_mode': config.binary_mode,
      **{k: v for k, v in found.items() if k != 'probabilities'},
      'cost_loss': cost_loss.form,
      'search_final': {k: last.get(k) for k in ('train_loss', 'train_accuracy', 'val_loss',
                                                'argmax_val_accuracy', 'entropy')},
      'search_history': result['history'], 'search_steps': result['num_steps'],
      'warmup_steps': result['warmup_steps'], 'arch_steps': result['arch_steps'],
      'loss': config.loss, **data.info,
      **retraining.final_results(config, final),
      'wall_time_s': retraining.wall_times(phase_times, final),
  }
  wd.write_summary(workdir, summary)
  return summary
