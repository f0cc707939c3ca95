"""Evaluate a zoo teacher or a trained model directory on a TFDS split.

  python -m dfnas_jax.main --config=configs/evaluate.py --config.model=cifar10_resnet20 \
      --config.dataset=cifar10 --config.split=test
"""
import ml_collections
from ml_collections import config_dict

PRESETS = ('',)


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = 'evaluate'
  c.model = 'cifar10_resnet20'    # zoo name or a directory with model.json + variables.msgpack
  c.checkpoint = ''               # optional weights: .msgpack or torchvision .pth/.npz/.safetensors
  c.dataset = 'cifar10'
  c.data_dir = config_dict.placeholder(str)
  c.download = True
  c.split = 'test'
  c.image_size = 0                # 0: the model's own input size
  c.augment = 'cifar'  # eval preprocessing: cifar (resize) | imagenet | crop (centre window)
  c.batch_size = 500
  if preset:
    raise ValueError(f'Unknown preset {preset!r} for evaluate; presets: {PRESETS}')
  return c
