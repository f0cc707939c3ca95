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
import functools
import os
import time
from typing import Any, Dict, Optional, Tuple

import flax
import flax.jax_utils
import jax
import ml_collections
import numpy as np
from absl import logging

from dfnas_jax import models, plots
from dfnas_jax import workdir as wd
from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.models import proxyless as space_lib
from dfnas_jax.nas import binary_gates, latency, retraining, search_data, search_loop, subnets
from dfnas_jax.train import loop, retrain, steps, trainer
from dfnas_jax.train import state as state_lib


def check_config(config) -> None:
  checks = {'binary_mode': (config.binary_mode, binary_gates.BINARY_MODES),
            'cost_model': (config.cost_model, latency.KINDS + ('none',)),
            'cost_loss': (config.cost_loss, binary_gates.COST_LOSSES),
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
           cost_loss: binary_gates.CostLoss) -> Dict[str, Any]:
  """Warm-up and search; resumes from workdir/checkpoints. Returns alphas and curves."""
  space = space_lib.SPACES[config.space]
  allowed = space.allowed()
  steps_per_epoch = ip.steps_per_epoch(train_source, config.batch_size)
  warmup_steps = config.warmup_epochs * steps_per_epoch
  num_steps = warmup_steps + config.num_epochs * steps_per_epoch
  lr_fn = binary_gates.weight_schedule(config, warmup_steps, num_steps - warmup_steps)
  tx = binary_gates.weight_optimizer(config, lr_fn)
  arch_tx = binary_gates.arch_optimizer(config)
  model = space_lib.ProxylessNet(space, train_source.num_classes, dropout=config.dropout,
                                 dtype=models.compute_dtype(config.compute_dtype),
                                 bn_epsilon=config.bn_epsilon)
  weight_rng, alpha_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  alphas = config.arch_init_std * jax.random.normal(alpha_rng, allowed.shape)
  state = state_lib.SearchState(
      weights=state_lib.create_train_state(model, weight_rng, space.image_size, tx),
      alphas=alphas, arch_opt_state=arch_tx.init(alphas))
  mngr, state, start_step, history = search_loop.restore(workdir, config, state, num_steps)
  runner = loop.Loop(workdir, start_step, num_steps)

  arch_steps = functools.partial(binary_gates.arch_steps_until, config, warmup_steps,
                                 steps_per_epoch)

  teacher_apply = teacher and teacher[0].apply
  extra_args = (steps.replicate(teacher[1]),) if teacher else ()
  p_weight_step = binary_gates.pmap_weight_step(config, allowed, lr_fn, teacher_apply)
  p_arch_step = binary_gates.pmap_arch_step(config, allowed, arch_tx, cost, cost_loss,
                                            teacher_apply)

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
    probs = np.asarray(binary_gates.probabilities(alphas, allowed))
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
  cost, cost_loss = binary_gates.cost_setup(config, space, num_classes, workdir)
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
  probs = np.asarray(binary_gates.probabilities(result['alphas'], space.allowed()))
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
