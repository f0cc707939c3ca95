"""What every NAS stage shares: the data it searches on and the final retraining."""
import os
from typing import Any, Dict, Tuple

import ml_collections
from absl import logging

from dfnas_jax import workdir as wd
from dfnas_jax.evaluation import retrain
from dfnas_jax.synthesis import synthesize


def synthetic_data(config, workdir: str) -> Tuple[str, Dict[str, Any]]:
  """The dataset to search on: configured, or synthesized (and reused) under WORKDIR."""
  if config.dataset:
    return config.dataset, {'dataset': config.dataset, 'synthesized': False}
  synth_dir = os.path.join(workdir, 'synthesize')
  summary_path = os.path.join(synth_dir, 'summary.json')
  if os.path.exists(summary_path):
    logging.info('Reusing the synthetic dataset in %s.', synth_dir)
    summary = wd.read_json(summary_path)
  else:
    summary = synthesize.run(config.synthesis, synth_dir)
  return summary['dataset_dir'], {'dataset': summary['dataset_dir'], 'synthesized': True,
                                 'num_images': summary['num_images']}


def retrain_architecture(config, architecture: str, dataset: str, train_split: str,
                         val_split: str, loss: str, workdir: str) -> Dict[str, Any]:
  """Trains the found `architecture` from scratch with `config.retrain` on all searched data.

  That is the whole synthetic set, or both configured real splits; evaluation
  uses config.eval_dataset / eval_data_dir / eval_split.
  """
  rc = ml_collections.ConfigDict(config.retrain.to_dict())
  rc.architecture = architecture
  rc.dataset, rc.data_dir = dataset, config.data_dir
  rc.train_split = f'{train_split}+{val_split}' if config.train_split else 'train'
  rc.teacher, rc.teacher_checkpoint = config.teacher, config.teacher_checkpoint
  rc.soft_labels, rc.loss = config.soft_labels, loss
  rc.eval_dataset, rc.eval_data_dir, rc.eval_split = (config.eval_dataset, config.eval_data_dir,
                                                      config.eval_split)
  return retrain.run(rc, workdir)
