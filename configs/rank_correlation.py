"""Consistency study: do synthetic data variants rank architectures as real data does?

  python -m dfnas_jax.main --config=configs/rank_correlation.py
  python -m dfnas_jax.main --config=configs/rank_correlation.py:smoke   # tests
  python -m dfnas_jax.main --config=configs/rank_correlation.py:nb201 \
    --config.benchmark_table=/path/to/nasbench201/cifar10.json  # + the offline flags below

On NAS-Bench-201 the K cells are drawn from benchmark_table, whose 200-epoch test
accuracies are the ground truth (no stand-alone training needed for it); the
real-data rows (`real_same_count`, `real`) train the same supernet on real_dataset
images. With --config.stand_alone=True the first stand_alone_architectures cells
are also trained alone: on real_dataset with hard labels (`real`), on each
synthetic variant and on the `real_same_count` images, by distillation.

Offline copy of CIFAR-10 (ground truth on train[:45000], everything scored on
train[45000:]):
  --config.real_dataset=cifar10_jpeg --config.real_data_dir=/path/to/tfds \
  --config.real_train_split='train[:45000]' --config.eval_dataset=cifar10_jpeg \
  --config.eval_data_dir=/path/to/tfds --config.eval_split='train[45000:]' --config.download=False

Report: docs/rank_correlation.md. A rerun with the same work directory skips
finished cells (a cell: one architecture trained on one variant, or one
variant's supernet), so the study can be stopped and continued, or widened by
adding variants.
"""
import ml_collections
from ml_collections import config_dict

from dfnas_jax.configs import retrain as retrain_config
from dfnas_jax.configs import search_data
from dfnas_jax.configs import synthesize as synthesize_config


def _smoke_data_and_supernet(c: ml_collections.ConfigDict, weight_decay: float) -> None:
  """Seconds-long data variants, supernets and statistics (tests, CI)."""
  c.synthesis = synthesize_config.get_config('smoke')
  c.real_train_split = 'train[:256]'
  c.val_per_class = 1
  c.supernet = search_data.trainer_fields(batch_size=8, steps=3, lr=0.05,
                                          weight_decay=weight_decay, image_size=32,
                                          augment='crop')
  c.calibration_batches, c.calibration_batch_size = 1, 8
  c.num_bootstrap = 50


def _smoke_stand_alone(c: ml_collections.ConfigDict) -> None:
  """Seconds-long stand-alone training, evaluated once on a few test images."""
  c.train = retrain_config.get_config('smoke')
  c.train.eval_every_steps = 10 ** 9
  c.eval_split = 'test[:64]'


PRESETS = ('', 'smoke', 'nb201', 'nb201_smoke')


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = 'rank_correlation'
  c.seed = 0
  c.teacher = 'cifar10_resnet20'
  c.teacher_checkpoint = ''
  # Distillation targets: teacher (its logits on each trained crop) | stored (the dataset's
  # logits, which label each canvas's centre window only: for window-sized images).
  c.soft_labels = 'teacher'

  # The K architectures: evenly spaced FLOPs quantiles of `pool_size` seeded paths
  # whose FLOPs lie in [flops_min, flops_max] (<= 0: unbounded); the supernets
  # train on the same band, their paths drawn as `path_sampling` says (configs/spos.py).
  c.space = 'spos_cifar'           # | darts | nb201-<C>x<N> (then benchmark_table)
  c.benchmark_table = ''
  c.num_architectures = 6
  c.pool_size = 1000
  c.flops_min = 0.0
  c.flops_max = 0.0
  c.path_sampling = 'flops_uniform'
  # space='darts': random genotypes (one_shot=False), networks of this size.
  c.darts_channels = 12
  c.darts_layers = 5

  # Data variants (dfnas_jax.evaluation.rank_correlation.VARIANTS), all of the
  # size of `synthesis`: full, no_rlc, no_regional, deepinversion, gaussian_noise.
  c.variants = 'full,no_rlc,no_regional,deepinversion,gaussian_noise'
  c.synthesis = synthesize_config.get_config()
  c.synthesis.images_per_round, c.synthesis.num_rounds = 128, 2
  # Reuse sets made once instead of synthesizing them: 'full=DIR,deepinversion=DIR' (the
  # `synthetic` directory of a synthesize stage), each of the size `synthesis` makes.
  c.synthetic_datasets = ''

  # Ground truth: real data with hard labels; every ranking is scored on eval_*.
  c.real_dataset = 'cifar10'
  c.real_data_dir = config_dict.placeholder(str)
  c.real_train_split = 'train'
  c.real_augment = 'cifar'
  c.synthetic_augment = 'crop'
  c.download = True
  search_data.add_real_evaluation(c)

  # Stand-alone training, the same schedule for every architecture and data.
  # On NAS-Bench-201 it is optional, for the first stand_alone_architectures
  # cells (<= 0: all K), and `real` is one more ranking scored against the table.
  c.stand_alone = True
  c.stand_alone_architectures = 0
  c.train = retrain_config.get_config()
  c.train.batch_size = 32
  c.train.num_train_steps = 120
  c.train.learning_rate = 0.05
  c.train.warmup_epochs = 0.0
  c.train.weight_decay = 5e-4
  c.train.eval_every_steps = 10 ** 9  # once, at the end
  c.train.checkpoint_every_steps = 100

  # One-shot: a supernet per variant, subnets scored on val_per_class random
  # images of each class (held out from it) after BatchNorm recalibration.
  c.one_shot = True
  c.dropout = 0.0
  c.val_per_class = 5
  c.supernet = search_data.trainer_fields(batch_size=32, steps=120, lr=0.1, weight_decay=4e-5,
                                          image_size=32, augment='crop')
  c.calibration_batches = 2
  c.calibration_batch_size = 64

  c.num_bootstrap = 1000

  if preset == 'smoke':
    c.space = 'spos_tiny'
    c.num_architectures, c.pool_size = 3, 20
    c.variants = 'full,gaussian_noise'
    _smoke_data_and_supernet(c, weight_decay=4e-5)
    _smoke_stand_alone(c)
  elif preset in ('nb201', 'nb201_smoke'):
    c.space = 'nb201-8x1'
    c.num_architectures = 100
    c.stand_alone = False
    c.path_sampling = 'uniform'  # every cell equally often, as the benchmark's SPOS baseline
    c.variants = ('full,no_rlc,no_regional,deepinversion,gaussian_noise,real_same_count,real')
    c.supernet = search_data.trainer_fields(batch_size=64, steps=500, lr=0.1, weight_decay=5e-4,
                                            image_size=32, augment='crop')
    # --config.stand_alone=True: the benchmark's schedule (SGD, nesterov, cosine, weight
    # decay 5e-4), shortened, for the first 20 cells at the supernet's size.
    c.stand_alone_architectures = 20
    c.train.batch_size = 64
    c.train.num_train_steps = 500
    c.train.learning_rate = 0.1
    if preset == 'nb201_smoke':
      c.space, c.num_architectures = 'nb201-4x1', 5
      c.variants = 'full,real_same_count'
      _smoke_data_and_supernet(c, weight_decay=5e-4)
      c.stand_alone_architectures = 3
      _smoke_stand_alone(c)
  elif preset:
    raise ValueError(f'Unknown preset {preset!r} for rank_correlation; presets: {PRESETS}')
  return c
