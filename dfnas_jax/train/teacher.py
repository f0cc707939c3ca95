"""Stage `teacher`: train a zoo classifier on a real TFDS dataset (hard labels)."""
import itertools
import os

import flax.jax_utils
import jax
import ml_collections
from absl import logging

from dfnas_jax import models, teachers
from dfnas_jax import workdir as wd
from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.train import state as state_lib
from dfnas_jax.train import steps, trainer


def check_config(config) -> None:
  trainer.check_config(config)
  models.build_model(config.architecture, num_classes=1)  # a bad name fails here


def run(config: ml_collections.ConfigDict, workdir: str):
  check_config(config)
  train_source = ip.get_source(config.dataset, config.train_split, config.data_dir, config.download)
  eval_source = (ip.get_source(config.dataset, config.eval_split, config.data_dir, config.download)
                 if config.eval_split else None)
  spec = teachers.Teacher(config.name, config.architecture, train_source.num_classes,
                          config.image_size, weights=None,
                          description=f'{config.architecture} trained on {config.dataset} '
                                      f'{config.train_split} by the teacher stage',
                          class_names=tuple(train_source.builder.info.features['label'].names))
  module = spec.module()
  template = jax.eval_shape(
      lambda: state_lib.init_variables(module, jax.random.PRNGKey(0), config.image_size))
  # Load every other model first: a wrong name fails before hours of training.
  initial = _load_matching(config.init_from, template, 'init_from') if config.init_from else None
  averaged_with = [name.strip() for name in config.average_with.split(',') if name.strip()]
  others = [_load_matching(name, template, 'average_with') for name in averaged_with]
  if others and config.average_batch_size <= 0:
    raise ValueError(f'config.average_batch_size must be positive, got {config.average_batch_size}')

  result = trainer.fit(config, workdir, module, train_source, eval_source,
                       initial_variables=initial)
  state = result['state']
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  eval_results = result['eval']
  if others:
    variables = average_weights(module, variables, others, train_source, config)
    if eval_source is not None:
      eval_results = trainer.evaluate(steps.replicate(variables), eval_source, config.batch_size,
                                      config.image_size, config.augment, apply_fn=module.apply)
    logging.info('Averaged with %s: eval %s (trained weights alone: %s)', averaged_with,
                 eval_results, result['eval'])
  if jax.process_index() == 0:
    teachers.save_trained(os.path.join(workdir, 'model'), spec, variables)
  summary = {
      'stage': 'teacher', 'name': config.name, 'architecture': config.architecture,
      'init_from': config.init_from, 'dataset': config.dataset, 'train_split': config.train_split,
      'eval_split': config.eval_split, 'num_train_steps': result['num_train_steps'],
      'eval_accuracy': eval_results.get('accuracy'), 'eval_loss': eval_results.get('loss'),
      'model_dir': os.path.join(workdir, 'model'), 'wall_time_s': result['wall_time_s'],
  }
  if others:
    summary.update(averaged_with=averaged_with,
                   trained_eval_accuracy=result['eval'].get('accuracy'),
                   trained_eval_loss=result['eval'].get('loss'))
  wd.write_summary(workdir, summary)
  return summary


def _load_matching(name: str, template, field: str):
  _, variables, _ = teachers.load(name)
  teachers.check_matches(variables, template, f'{field} {name!r}')
  return variables


def average_weights(module, variables, others, train_source: ip.DataSource, config):
  """SWA over cosine-cycle ends: the mean of the parameters of `variables` and
  `others`, with BatchNorm statistics recomputed for it (no model's running
  statistics fit averaged weights) over one augmented pass of the training split."""
  params = jax.tree_util.tree_map(lambda *p: sum(p) / len(p),
                                  variables['params'], *[o['params'] for o in others])
  num_batches = ip.steps_per_epoch(train_source, config.average_batch_size)
  if not num_batches:
    raise ValueError(f'config.average_batch_size={config.average_batch_size} is larger than '
                     f'the {train_source.num_examples} training examples.')
  batches = itertools.islice(
      ip.train_batches(train_source, config.average_batch_size, config.image_size,
                       config.augment, config.seed + 1), num_batches)
  stats = steps.mean_batch_stats(
      steps.pmap_batch_stats_step(module),
      steps.replicate({'params': params, 'batch_stats': variables['batch_stats']}), batches)
  return {'params': params, 'batch_stats': jax.device_get(flax.jax_utils.unreplicate(stats))}
