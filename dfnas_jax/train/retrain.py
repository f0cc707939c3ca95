"""Stage `retrain`: train an architecture from scratch on synthetic or real data.

On a synthetic dataset it distils the teacher (soft labels: the stored logits,
or the teacher recomputed on each augmented batch); on a real dataset it can
also train on hard labels. The result is evaluated on a real split when one is
configured, which is how the quality of synthetic data is measured.
"""
import os
from typing import Optional

import jax
import ml_collections

from dfnas_jax import teachers
from dfnas_jax import workdir as wd
from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.train import trainer

SOFT_LABELS = ('stored', 'teacher')


def check_soft_labels(config) -> None:
  if config.soft_labels not in SOFT_LABELS:
    raise ValueError(f'soft_labels must be one of {SOFT_LABELS}, got {config.soft_labels!r}')


def check_config(config) -> None:
  check_soft_labels(config)
  trainer.check_config(config)
  if config.loss == 'distillation' and config.soft_labels == 'teacher':
    teachers.get(config.teacher)  # a bad name or directory fails before any work


def distillation_teacher(loss: str, config):
  """(teacher, variables) when soft labels are the teacher's on each batch, else None.

  The teacher sees each batch at its own input size (`teachers.AtInputSize`).
  Uses config.soft_labels, config.teacher and config.teacher_checkpoint.
  """
  if loss == 'distillation' and config.soft_labels == 'teacher':
    module, variables, spec = teachers.load(config.teacher, config.teacher_checkpoint or None)
    return teachers.AtInputSize(module, spec.image_size), variables
  return None


def run(config: ml_collections.ConfigDict, workdir: str,
        train_source: Optional[ip.DataSource] = None,
        eval_source: Optional[ip.DataSource] = None):
  """Trains `config.architecture` on `config.dataset`'s `train_split`, or on `train_source`
  when given (a subset of it that no split string names, e.g. class-balanced rows), and
  evaluates it on `config.eval_dataset`'s `eval_split`, or on `eval_source` when given
  (e.g. the rows of the same data held out from `train_source`)."""
  check_config(config)
  if train_source is None:
    train_source = ip.get_source(config.dataset, config.train_split, config.data_dir,
                                 config.download)
  if eval_source is None and config.eval_dataset:
    eval_source = ip.get_source(config.eval_dataset, config.eval_split, config.eval_data_dir,
                                config.download, fields='eval_',
                                skip="--config.eval_dataset='' (no real-data evaluation)")
  if eval_source is not None and eval_source.num_classes != train_source.num_classes:
    raise ValueError(f'Train data has {train_source.num_classes} classes but eval dataset '
                     f'{config.eval_dataset!r} has {eval_source.num_classes}.')
  teacher = distillation_teacher(config.loss, config)
  spec = teachers.Teacher(
      config.name or config.architecture, config.architecture, train_source.num_classes,
      config.image_size, weights=None,
      description=f'{config.architecture} trained by the retrain stage on {config.dataset}')
  result = trainer.fit(config, workdir, spec.module(), train_source, eval_source, teacher)
  state = result['state']
  if jax.process_index() == 0:
    teachers.save_trained(os.path.join(workdir, 'model'), spec,
                          {'params': state.params, 'batch_stats': state.batch_stats})
  summary = {
      'stage': 'retrain', 'architecture': config.architecture,
      'num_params': int(sum(x.size for x in jax.tree_util.tree_leaves(state.params))),
      'train_data': config.dataset, 'train_split': config.train_split,
      'num_train_examples': train_source.num_examples, 'loss': config.loss,
      'label_smoothing': config.label_smoothing,
      'soft_labels': config.soft_labels if config.loss == 'distillation' else None,
      'num_train_steps': result['num_train_steps'],
      'eval_data': config.eval_dataset or None, 'eval_split': config.eval_split or None,
      'num_eval_examples': eval_source.num_examples if eval_source is not None else 0,
      'eval_accuracy': result['eval'].get('accuracy'), 'eval_loss': result['eval'].get('loss'),
      'model_dir': os.path.join(workdir, 'model'), 'wall_time_s': result['wall_time_s'],
  }
  wd.write_summary(workdir, summary)
  return summary
