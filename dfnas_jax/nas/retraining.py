"""What a search ends with: the found architecture retrained from scratch on the searched
and/or real data, and summary.json's entries for it."""
from typing import Any, Dict, List

import ml_collections

from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.nas import search_data
from dfnas_jax.train import retrain, trainer

RETRAIN_DATA = ('synthetic', 'real')


def retrain_data(config) -> List[str]:
  """config.retrain_data as a list: 'synthetic', 'real' or both, in the given order."""
  names = [n.strip() for n in config.retrain_data.split(',') if n.strip()]
  if not names or len(set(names)) != len(names) or not set(names) <= set(RETRAIN_DATA):
    raise ValueError(f'retrain_data must be one or both of {RETRAIN_DATA} (comma-separated), '
                     f'got {config.retrain_data!r}')
  return names


def check_real_data(config) -> None:
  """Resolves the real data a search ends with (its evaluation split, a real retraining
  split and the retraining schedule on it) before any work, so a missing or misnamed
  dataset, or a warm-up longer than the schedule on it, fails first."""
  if config.eval_dataset:
    ip.get_source(config.eval_dataset, config.eval_split, config.eval_data_dir, config.download,
                  fields='eval_', skip="--config.eval_dataset='' (no real-data evaluation)")
  if 'real' in retrain_data(config):
    source = ip.get_source(config.real_dataset, config.real_train_split, config.real_data_dir,
                           config.download, fields='real_',
                           skip='--config.retrain_data=synthetic (no retraining on real data)')
    trainer.schedule_steps(config.retrain, source, fields='retrain.')


def retrain_configs(config, architecture: str, dataset: str,
                    loss: str) -> Dict[str, ml_collections.ConfigDict]:
  """The retrain stage's config for each of `config.retrain_data`: `config.retrain` with
  the stage's teacher, evaluation data and training data.

  'synthetic' is all searched data (the whole synthetic `dataset`, or both configured
  real splits) with the search's `loss`; 'real' is the real training split with hard
  labels and label smoothing.
  """
  configs = {}
  for name in retrain_data(config):
    rc = ml_collections.ConfigDict(config.retrain.to_dict())
    rc.stage, rc.architecture, rc.download = 'retrain', architecture, config.download
    rc.teacher, rc.teacher_checkpoint = config.teacher, config.teacher_checkpoint
    rc.eval_dataset, rc.eval_data_dir, rc.eval_split = (config.eval_dataset,
                                                        config.eval_data_dir, config.eval_split)
    if name == 'synthetic':
      rc.dataset, rc.data_dir = dataset, config.data_dir
      rc.train_split = (f'{config.train_split}+{config.val_split}' if config.train_split
                        else 'train')
      rc.soft_labels, rc.loss = config.soft_labels, loss
    else:
      rc.dataset, rc.data_dir, rc.train_split = (config.real_dataset, config.real_data_dir,
                                                 config.real_train_split)
      rc.loss, rc.label_smoothing, rc.augment = ('cross_entropy', config.real_label_smoothing,
                                                 config.real_augment)
      rc.soft_labels = 'teacher'  # hard labels: no soft labels are read (and none stored)
    configs[name] = rc
  return configs


def retrain_architecture(config, architecture: str, data: search_data.SearchData, loss: str,
                         workdir: str) -> Dict[str, Dict[str, Any]]:
  """Trains the found `architecture` from scratch on each of `config.retrain_data`
  (`retrain_configs`), in `workdir` (synthetic) and `workdir`_real; {name: summary}."""
  return {name: retrain.run(rc, workdir if name == 'synthetic' else f'{workdir}_real')
          for name, rc in retrain_configs(config, architecture, data.dataset, loss).items()}


def wall_times(phases: Dict[str, float],
               finals: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
  """summary.json's `wall_time_s`: seconds per phase, `retrain_s` from the retrained
  `finals`, and their sum; each phase counts the work it kept over every attempt."""
  times = dict(phases, retrain_s=sum(f['wall_time_s'] for f in finals.values()))
  times = {k: round(v, 1) for k, v in times.items()}
  return dict(times, total_s=round(sum(times.values()), 1))


def final_results(config, finals: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
  """summary.json's entries for the retrained architecture: the first of
  `config.retrain_data` as `final_accuracy`, every one under `final_by_train_data`."""
  first = finals[retrain_data(config)[0]]
  return {'final_accuracy': first['eval_accuracy'],
          'final_train_data': retrain_data(config)[0],
          'final_by_train_data': {name: {'accuracy': f['eval_accuracy'],
                                         'train_data': f"{f['train_data']} {f['train_split']}",
                                         'loss': f['loss'], 'model_dir': f['model_dir']}
                                  for name, f in finals.items()},
          'final_eval_data': (f'{config.eval_dataset} {config.eval_split}'
                              if config.eval_dataset else None),
          'retrain_model_dir': first['model_dir']}
