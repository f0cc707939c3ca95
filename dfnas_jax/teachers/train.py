"""Stage `teacher`: train a zoo classifier on a real TFDS dataset (hard labels)."""
import os

import jax
import ml_collections

from dfnas_jax import teachers
from dfnas_jax import workdir as wd
from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.train import state as state_lib
from dfnas_jax.train import trainer


def run(config: ml_collections.ConfigDict, workdir: str):
  train_source = ip.get_source(config.dataset, config.train_split, config.data_dir, config.download)
  eval_source = (ip.get_source(config.dataset, config.eval_split, config.data_dir, config.download)
                 if config.eval_split else None)
  spec = teachers.Teacher(config.name, config.architecture, train_source.num_classes,
                          config.image_size, weights=None,
                          description=f'{config.architecture} trained on {config.dataset} '
                                      f'{config.train_split} by the teacher stage',
                          class_names=tuple(train_source.builder.info.features['label'].names))
  module = spec.module()
  initial = None
  if config.init_from:  # Fine-tune: start from another teacher's weights.
    _, initial, _ = teachers.load(config.init_from)
    template = jax.eval_shape(
        lambda: state_lib.init_variables(module, jax.random.PRNGKey(0), config.image_size))
    teachers.check_matches(initial, template, f'init_from {config.init_from!r}')
  result = trainer.fit(config, workdir, module, train_source, eval_source,
                       initial_variables=initial)
  state = result['state']
  if jax.process_index() == 0:
    teachers.save_trained(os.path.join(workdir, 'model'), spec,
                          {'params': state.params, 'batch_stats': state.batch_stats})
  summary = {
      'stage': 'teacher', 'name': config.name, 'architecture': config.architecture,
      'init_from': config.init_from, 'dataset': config.dataset, 'train_split': config.train_split,
      'eval_split': config.eval_split, 'num_train_steps': result['num_train_steps'],
      'eval_accuracy': result['eval'].get('accuracy'), 'eval_loss': result['eval'].get('loss'),
      'model_dir': os.path.join(workdir, 'model'), 'wall_time_s': result['wall_time_s'],
  }
  wd.write_summary(workdir, summary)
  return summary
