"""Stage `evaluate`: accuracy of a zoo teacher or a trained model directory on a TFDS split."""
import flax.jax_utils
import ml_collections

from dfnas_jax import teachers
from dfnas_jax import workdir as wd
from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.train import trainer


def check_config(config) -> None:
  teachers.get(config.model)
  if config.augment not in ip.AUGMENTATIONS:
    raise ValueError(f'augment must be one of {ip.AUGMENTATIONS}, got {config.augment!r}')
  if config.batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {config.batch_size}')


def run(config: ml_collections.ConfigDict, workdir: str):
  check_config(config)
  module, variables, spec = teachers.load(config.model, config.checkpoint or None)
  source = ip.get_source(config.dataset, config.split, config.data_dir, config.download)
  if source.num_classes != spec.num_classes:
    raise ValueError(f'Model {config.model!r} predicts {spec.num_classes} classes but '
                     f'dataset {config.dataset!r} has {source.num_classes}.')
  image_size = config.image_size or spec.image_size
  results = trainer.evaluate(flax.jax_utils.replicate(variables), source, config.batch_size,
                             image_size, config.augment, apply_fn=module.apply)
  summary = {'stage': 'evaluate', 'model': config.model, 'dataset': config.dataset,
             'split': config.split, 'accuracy': results['accuracy'], 'loss': results['loss'],
             'num_examples': source.num_examples}
  wd.write_summary(workdir, summary)
  return summary
