"""Train an architecture from scratch on synthetic data (distillation) or real data.

  python -m dfnas_jax.main --config=configs/retrain.py \
      --config.dataset=workdir/synthesize/synthetic --config.eval_dataset=cifar10
  python -m dfnas_jax.main --config=configs/retrain.py:smoke   # seconds, for tests
"""
import ml_collections
from ml_collections import config_dict

from dfnas_jax.configs import training

PRESETS = ('', 'smoke')


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = 'retrain'
  c.name = ''                          # recorded in model.json; default the architecture
  c.architecture = 'cifar_resnet20'    # dfnas_jax.models.ARCHITECTURES

  # Training data: a synthetic dataset directory (written by `synthesize`) or a TFDS name.
  c.dataset = 'workdir/synthesize/synthetic'
  c.data_dir = config_dict.placeholder(str)
  c.download = True
  c.train_split = 'train'
  c.image_size = 32
  c.augment = 'crop'                   # crop (synthetic canvases) | cifar | imagenet | none

  # Loss: distillation on soft labels, or cross_entropy on hard labels (real data).
  c.loss = 'distillation'
  c.soft_labels = 'teacher'            # teacher: recomputed on each augmented batch | stored
  c.teacher = 'cifar10_resnet20'
  c.teacher_checkpoint = ''
  c.temperature = 3.0
  c.label_smoothing = 0.0

  # Real-data evaluation ('' to skip).
  c.eval_dataset = 'cifar10'
  c.eval_data_dir = config_dict.placeholder(str)
  c.eval_split = 'test'

  training.add_sgd(c)
  c.log_every_steps = 50
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 200
  c.keep_checkpoints = 2

  if preset == 'smoke':
    c.architecture = 'cifar_resnet8'
    c.batch_size = 8
    c.num_train_steps = 6
    c.warmup_epochs = 0.0
    c.eval_split = 'test[:64]'
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 3
  elif preset:
    raise ValueError(f'Unknown preset {preset!r} for retrain; presets: {PRESETS}')
  return c
