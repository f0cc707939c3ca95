"""Train a zoo classifier on real data (the shipped `cifar10_resnet20` was made with this).

  python -m dfnas_jax.main --config=configs/teacher.py
  python -m dfnas_jax.main --config=configs/teacher.py:smoke   # seconds, for tests
"""
import ml_collections
from ml_collections import config_dict

from dfnas_jax.configs import training

PRESETS = ('', 'smoke')


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = 'teacher'
  c.name = 'cifar10_resnet20'           # name recorded in the exported model.json
  c.architecture = 'cifar_resnet20'     # dfnas_jax.models.ARCHITECTURES
  c.dataset = 'cifar10'                 # TFDS name or dataset directory
  c.data_dir = config_dict.placeholder(str)
  c.download = True
  c.train_split = 'train'
  c.eval_split = 'test'                 # '' for no evaluation
  c.image_size = 32
  c.augment = 'cifar'                   # cifar | imagenet | none

  c.init_from = ''                      # teacher name or model dir to fine-tune; '' = scratch
  # SWA over cosine-cycle ends: after training, average the weights with these models'
  # (comma-separated teacher names or model dirs) and recompute the BatchNorm statistics
  # over one augmented pass of the training split, in batches of average_batch_size.
  c.average_with = ''
  c.average_batch_size = 500
  training.add_sgd(c)
  c.loss = 'cross_entropy'
  c.label_smoothing = 0.0
  c.temperature = 1.0

  c.log_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2

  if preset == 'smoke':
    c.train_split, c.eval_split = 'train[:256]', 'train[256:384]'
    c.batch_size = 32
    c.num_epochs = 1.0
    c.warmup_epochs = 0.25
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 4
  elif preset:
    raise ValueError(f'Unknown preset {preset!r} for teacher; presets: {PRESETS}')
  return c
