"""Training-free estimators on NAS-Bench-201: synthetic vs real data (dfnas_jax.nas.zero_cost).

  python -m dfnas_jax.main --config=configs/zero_cost_study.py \
    --config.benchmark_table=/path/to/nasbench201/cifar10.json  # + the offline flags below
  python -m dfnas_jax.main --config=configs/zero_cost_study.py:smoke ...  # tests

Offline copy of CIFAR-10:
  --config.real_dataset=cifar10_jpeg --config.real_data_dir=/path/to/tfds \
  --config.real_train_split='train[:45000]' --config.download=False

Report: docs/zero_shot.md. A rerun with the same work directory continues after the last
saved cell.
"""
import ml_collections
from ml_collections import config_dict

from dfnas_jax.configs import synthesize as synthesize_config

PRESETS = ('', 'smoke')


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = 'zero_cost_study'
  c.seed = 0  # draws the cells, the batches and the network's initialization
  c.teacher = 'cifar10_resnet20'
  c.teacher_checkpoint = ''

  # The benchmark's network (C=16, N=5) as the published numbers use; 'nb201-<C>x<N>' smaller.
  c.space = 'nb201'
  c.benchmark_table = ''
  c.num_architectures = 1000  # <= 0: all 15,625
  # dfnas_jax.nas.zero_cost.ESTIMATORS, comma-separated: fewer run only the passes they read.
  c.estimators = ','.join(('naswot', 'jacob_cov', 'grad_norm', 'snip', 'zico',
                           'teacher_agreement', 'teacher_cka', 'synflow', 'params', 'flops'))
  c.image_size = 32

  # Data sources (dfnas_jax.evaluation.zero_cost_study.SOURCES), each labelled by the teacher.
  c.sources = 'full,deepinversion,noise,real_same_count,real'
  c.batch_size = 64
  c.num_batches = 1  # per cell and source: scores are their mean, `spread` their std
  c.num_groups = 2   # of each batch, for zico and teacher_agreement
  c.synthesis = synthesize_config.get_config()
  c.synthesis.images_per_round, c.synthesis.num_rounds = 128, 2  # as rank_correlation's
  # Reuse sets made once instead of synthesizing them: 'full=DIR,deepinversion=DIR' (the
  # `synthetic` directory of a synthesize stage), each of the size `synthesis` makes.
  c.synthetic_datasets = ''

  c.real_dataset = 'cifar10'
  c.real_data_dir = config_dict.placeholder(str)
  c.real_train_split = 'train'
  c.download = True

  c.num_bootstrap = 1000

  if preset == 'smoke':
    c.space, c.num_architectures = 'nb201-2x1', 4
    c.sources = 'full,noise,real_same_count,real'
    c.synthesis = synthesize_config.get_config('smoke')
    c.batch_size, c.num_batches = 8, 2
    c.num_bootstrap = 20
  elif preset:
    raise ValueError(f'Unknown preset {preset!r} for zero_cost_study; presets: {PRESETS}')
  return c
