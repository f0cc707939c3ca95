"""Stage `darts`: data-free DARTS, differentiable cell search on synthetic soft labels.

  synthesize (or reuse)  ->  split in halves: weights / architecture
  -> bilevel search: per step, one Adam step on the architecture logits (the
     hypergradient of the held-out half's loss, `nas.bilevel`), then one SGD
     step on the weights with the updated logits (distillation)
  -> genotype JSON and heat map every epoch, cell diagrams of the result
  -> retrain the genotype's network from scratch -> evaluate on real data

The search checkpoints (weights, BN statistics, logits, both optimizer states;
the data position is the step) with orbax and resumes after a kill.
"""
import os
from typing import Any, Dict, Optional, Tuple

import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dfnas_jax import models, plots
from dfnas_jax import workdir as wd
from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.data import nasbench201
from dfnas_jax.models import darts as space
from dfnas_jax.models import nb201
from dfnas_jax.nas import bilevel, retraining, search_data, search_loop
from dfnas_jax.train import loop, retrain, steps, trainer
from dfnas_jax.train import state as state_lib

AXIS = steps.AXIS


def check_config(config) -> None:
  if config.space != 'darts':
    nb201.parse_name(config.space)  # a NAS-Bench-201 network, or one clear error
    if nb201.parse_name(config.space)[2] is not None:
      raise ValueError(f'space={config.space!r} names one cell; the search space is '
                       f"{config.space.split(':')[0]!r}.")
  elif config.benchmark_table:
    raise ValueError("benchmark_table is a NAS-Bench-201 table, but space='darts'; search "
                     "space='nb201' or 'nb201-<C>x<N>' to look the found cell up.")
  if config.mode not in bilevel.MODES:
    raise ValueError(f'darts mode must be one of {bilevel.MODES}, got {config.mode!r}')
  if config.loss not in ('distillation', 'cross_entropy'):
    raise ValueError(f"darts loss must be 'distillation' or 'cross_entropy', got {config.loss!r}")
  retrain.check_soft_labels(config)
  models.compute_dtype(config.compute_dtype)  # a bad name fails before any work
  search_data.check_search_data(config, config.loss, config.augment, config.image_size)
  retraining.retrain_data(config)
  made = config.synthesis.images_per_round * config.synthesis.num_rounds
  if not config.dataset and made // 2 < config.batch_size:
    raise ValueError(f'The synthesis makes {made} images, whose halves (weight and '
                     f'architecture sets) are smaller than batch_size={config.batch_size}.')


def derive(config, alphas) -> Tuple[Any, Dict[str, Any]]:
  """The searched space's result for `alphas` and its JSON form: a DARTS genotype, or
  a NAS-Bench-201 cell (the argmax op per edge)."""
  if config.space == 'darts':
    genotype = space.derive_genotype(alphas)
    return genotype, genotype.to_json()
  ops = nb201.derive_architecture(alphas)
  return ops, {'cell': nb201.arch_to_string(ops), 'ops': list(ops)}


def write_genotype_files(config, directory: str, epoch: int, alphas) -> Dict[str, Any]:
  """genotypes/epoch_NNN.json and the heat map of the softmaxed weights (latest epoch);
  returns the derived result's JSON."""
  result, as_json = derive(config, alphas)
  if jax.process_index() == 0:
    weights = {t: np.asarray(jax.nn.softmax(jnp.asarray(a), -1)) for t, a in alphas.items()}
    if config.space == 'darts':
      labels, ops, saved = space.edge_labels(), space.PRIMITIVES, space.genotype_json(result,
                                                                                       alphas)
    else:
      labels = [f'n{node} <- {i}' for node, i in nb201.EDGES]
      ops = nb201.OPS
      saved = {**as_json, 'primitives': list(ops),
               'weights': {t: w.round(4).tolist() for t, w in weights.items()}}
    wd.write_json(os.path.join(directory, 'genotypes', f'epoch_{epoch:03d}.json'), saved)
    plots.architecture_heatmap(weights, labels, ops, os.path.join(directory, 'alphas.png'),
                               title=f'softmax(alpha) after epoch {epoch}')
  return as_json


def search(config, workdir: str, train_source: ip.DataSource, val_source: ip.DataSource,
           teacher: Optional[Tuple[Any, Any]]) -> Dict[str, Any]:
  """The bilevel search; resumes from workdir/checkpoints. Returns alphas and curves."""
  steps_per_epoch = ip.steps_per_epoch(train_source, config.batch_size)
  num_steps = config.num_epochs * steps_per_epoch
  tx, lr_fn = bilevel.weight_optimizer(config, num_steps)
  arch_tx = bilevel.arch_optimizer(config)
  dtype = models.compute_dtype(config.compute_dtype)
  weight_rng, alpha_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  if config.space == 'darts':
    model = space.DARTSSearchNet(train_source.num_classes, config.init_channels, config.layers,
                                 dtype=dtype)
    alphas = space.initial_alphas(alpha_rng)
  else:
    channels, cells, _ = nb201.parse_name(config.space)
    model = nb201.NB201SearchNet(train_source.num_classes, channels, cells, dtype=dtype)
    alphas = nb201.initial_alphas(alpha_rng)
  state = state_lib.SearchState(
      weights=state_lib.create_train_state(model, weight_rng, config.image_size, tx),
      alphas=alphas, arch_opt_state=arch_tx.init(alphas))
  mngr, state, start_step, history = search_loop.restore(workdir, config, state, num_steps)
  runner = loop.Loop(workdir, start_step, num_steps)
  p_step = bilevel.pmap_config_search_step(config, arch_tx, lr_fn,
                                           teacher_apply=teacher and teacher[0].apply)
  extra_args = (steps.replicate(teacher[1]),) if teacher else ()

  def batches(source, seed):
    return ip.train_batches(source, config.batch_size, config.image_size, config.augment,
                            seed, start_step=start_step)
  data = flax.jax_utils.prefetch_to_device(
      zip(batches(train_source, config.seed), batches(val_source, config.seed + 1)), 2)

  def step_fn(rstate, step):
    train_batch, val_batch = next(data)
    rstate, train_m, arch_m = p_step(rstate, train_batch, val_batch, *extra_args)
    return rstate, {'train_': train_m, '': arch_m}

  def epoch_end(step, epoch, rstate, scalars):
    alphas = jax.device_get(flax.jax_utils.unreplicate(rstate.alphas))
    genotype = write_genotype_files(config, workdir, epoch, alphas)
    history.append({'epoch': epoch, 'step': step, **scalars, 'genotype': genotype})
    logging.info('Epoch %d: %s, genotype %s', epoch, scalars, genotype)

  final = search_loop.run(runner, state, step_fn, config=config, mngr=mngr,
                          workdir=workdir, history=history, steps_per_epoch=steps_per_epoch,
                          on_epoch_end=epoch_end)
  return {'alphas': final.alphas, 'history': history, 'num_steps': num_steps,
          'steps_per_epoch': steps_per_epoch, 'wall_time_s': runner.stopwatch.seconds()}


def run(config: ml_collections.ConfigDict, workdir: str):
  check_config(config)
  retraining.check_real_data(config)
  table = nasbench201.load(config.benchmark_table) if config.benchmark_table else None
  # The reference halves the training data into weight and architecture sets.
  data = search_data.load(config, workdir, fraction=0.5)
  for name, source in (('weight', data.train), ('architecture', data.val)):
    if source.num_examples < config.batch_size:
      raise ValueError(f'The {name} set has {source.num_examples} images, fewer than '
                       f'batch_size={config.batch_size}.')
  phase_times = {'data_s': data.seconds}
  train_source, val_source = data.train, data.val
  teacher = retrain.distillation_teacher(config.loss, config)
  trainer.require_soft_labels(config.loss, teacher, train_source, config.augment,
                              config.image_size)

  result = search(config, os.path.join(workdir, 'search'), train_source, val_source, teacher)
  phase_times['search_s'] = result['wall_time_s']
  found, found_json = derive(config, result['alphas'])
  if config.space == 'darts':
    r = config.retrain_network
    name = space.architecture_name(found, r.init_channels, r.layers, r.auxiliary, r.drop_path)
    if jax.process_index() == 0:
      for cell in space.CELL_TYPES:
        plots.cell_diagram(getattr(found, cell), os.path.join(workdir, f'{cell}_cell.png'),
                           title=f'{cell} cell')
  else:  # the found cell, retrained in the searched network's size
    channels, cells, _ = nb201.parse_name(config.space)
    name = nb201.architecture_name(found, channels, cells)
  network = models.build_model(name, train_source.num_classes)
  variables = jax.eval_shape(lambda: state_lib.init_variables(
      network, jax.random.PRNGKey(0), config.retrain.image_size))
  num_params = int(sum(x.size for x in jax.tree_util.tree_leaves(variables['params'])))
  logging.info('Found %s: %d parameters as %s', found_json, num_params, name)

  final = retraining.retrain_architecture(config, name, data, config.loss,
                                          os.path.join(workdir, 'retrain'))

  last = result['history'][-1] if result['history'] else {}
  summary = {
      'stage': 'darts', 'space': config.space, 'mode': config.mode, 'genotype': found_json,
      'architecture': name, 'params': num_params,
      **(table.summary_entry(found) if table is not None else {}),
      'search_final': {k: last.get(k) for k in ('train_loss', 'train_accuracy', 'val_loss')},
      'search_history': [{k: v for k, v in h.items() if k != 'genotype'}
                         for h in result['history']],
      'search_steps': result['num_steps'], 'loss': config.loss, **data.info,
      **retraining.final_results(config, final),
      'wall_time_s': retraining.wall_times(phase_times, final),
  }
  wd.write_summary(workdir, summary)
  return summary
