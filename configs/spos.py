"""Data-free SPOS: synthesize -> supernet -> evolutionary search -> retrain -> evaluate.

  python -m dfnas_jax.main --config=configs/spos.py        # ~18 min on 2 CPU cores
  python -m dfnas_jax.main --config=configs/spos.py:smoke  # CI, a couple of minutes
  python -m dfnas_jax.main --config=configs/spos.py:imagenet --config.teacher_checkpoint=r50.pth
  python -m dfnas_jax.main --config=configs/spos.py:nb201 --config.benchmark_table=cifar10.json

On NAS-Bench-201 (`nb201`, `nb201_smoke`) the found cell's published 200-epoch
CIFAR-10 accuracy and rank are read from `benchmark_table` (docs/nasbench201_table.md).

Real-data evaluation of the retrained architecture, offline copy of CIFAR-10:
  --config.eval_dataset=cifar10_jpeg --config.eval_data_dir=/path/to/tfds \
  --config.eval_split='train[45000:]'
Search on real data with hard labels instead (the comparison experiments):
  --config.dataset=cifar10_jpeg --config.data_dir=... --config.train_split='train[:40000]' \
  --config.val_split='train[40000:45000]' --config.supernet.loss=cross_entropy \
  --config.supernet.augment=cifar --config.retrain.augment=cifar
(the retrain stage then trains on train_split + val_split with hard labels).
"""
import ml_collections

from dfnas_jax.configs import search_data
from dfnas_jax.configs import synthesize as synthesize_config


def _smoke_scale(c: ml_collections.ConfigDict, weight_decay: float) -> None:
  """Seconds-long synthesis, supernet, search and retraining (tests, CI)."""
  c.synthesis = synthesize_config.get_config('smoke')
  c.val_per_class = 1
  c.supernet = search_data.trainer_fields(batch_size=8, steps=4, lr=0.05,
                                          weight_decay=weight_decay, image_size=32,
                                          augment='crop')
  c.supernet.checkpoint_every_steps = 2
  c.search.update(population=4, generations=2, top_k=2, num_mutations=2, num_crossovers=1)
  c.calibration_batches, c.calibration_batch_size = 1, 8
  search_data.add_retraining(c, 'smoke')
  c.eval_split = 'test[:64]'


PRESETS = ('', 'smoke', 'imagenet', 'nb201', 'nb201_smoke')


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = 'spos'
  search_data.add_teacher_and_data(c)
  # Held out from the synthetic set for the search, and scored against each image's label
  # (the teacher's argmax on it; the reference scores the class it was synthesized for).
  c.val_per_class = 8
  c.train_split = ''             # explicit splits override val_per_class (real data)
  c.val_split = ''
  c.soft_labels = 'teacher'      # teacher: recomputed per augmented batch | stored

  # Search space (dfnas_jax.models.spos.SPACES, or a NAS-Bench-201 network 'nb201',
  # 'nb201-<C>x<N>') and the FLOPs band of sampled paths.
  c.space = 'spos_cifar'
  c.benchmark_table = ''         # NAS-Bench-201 results (nb201 spaces): found cell's accuracy
  c.flops_min = 13.0             # MFLOPs (multiply-adds); <= 0: no lower bound
  c.flops_max = 15.5             # <= 0: no upper bound
  # Supernet paths: flops_uniform (the reference): a FLOPs bin of the band uniformly,
  # then a path of it | uniform: uniform paths, redrawn until in the band.
  c.path_sampling = 'flops_uniform'
  c.dropout = 0.1
  # Weights start He-normal (fan-out), as every network here; the reference draws its first
  # conv and classifier from N(0, 0.01) and the other convolutions from N(0, 1/in).

  c.supernet = search_data.trainer_fields(batch_size=32, steps=250, lr=0.1, weight_decay=4e-5,
                                          image_size=32, augment='crop')

  c.search = ml_collections.ConfigDict(dict(
      population=16, generations=5, top_k=5, num_mutations=6, mutation_prob=0.1,
      num_crossovers=6, max_tries=1000))
  c.search_flops_max = 15.0      # candidates above this are not considered
  c.calibration_batches = 2      # BN recalibration batches per candidate
  c.calibration_batch_size = 64

  # No warm-up, as the reference's retraining; one counted in epochs of the data would
  # also outlast 300 steps on real data (retrain_data='real').
  search_data.add_retraining(c, batch_size=64, num_train_steps=300, learning_rate=0.05,
                             weight_decay=4e-5, warmup_epochs=0.0, checkpoint_every_steps=50)

  search_data.add_real_evaluation(c)
  search_data.add_retraining_data(c)

  if preset == 'smoke':
    _smoke_scale(c, weight_decay=4e-5)
    c.space = 'spos_tiny'
    c.flops_min, c.flops_max, c.search_flops_max = 0.0, 2.4, 2.3
  elif preset == 'imagenet':
    c.teacher = 'resnet50'
    c.synthesis = synthesize_config.get_config('imagenet')
    c.space = 'spos_imagenet'
    c.flops_min, c.flops_max, c.search_flops_max = 290.0, 360.0, 330.0
    c.supernet = search_data.trainer_fields(batch_size=1024, steps=150_000, lr=0.5,
                                            weight_decay=4e-5, image_size=224, augment='imagenet')
    c.supernet.checkpoint_every_steps = 2000
    c.search.update(population=50, generations=20, top_k=10, num_mutations=25,
                    num_crossovers=25)
    c.calibration_batches, c.calibration_batch_size = 200, 128
    c.retrain.image_size, c.retrain.augment = 224, 'imagenet'
    c.retrain.batch_size, c.retrain.num_train_steps = 1024, 300_000
    c.retrain.learning_rate, c.retrain.weight_decay = 0.5, 4e-5
    c.retrain.lr_schedule = 'linear'
    c.retrain.checkpoint_every_steps = 2000
    c.eval_dataset, c.eval_split = 'imagenet2012', 'validation'
    c.real_dataset, c.real_augment = 'imagenet2012', 'imagenet'
  elif preset in ('nb201', 'nb201_smoke'):
    # Uniform single-path sampling over all 5**6 cells, as the benchmark's SPOS baseline;
    # a reduced network (C channels, N cells per stage) is the one-shot proxy.
    c.space = 'nb201-8x1'
    c.flops_min = c.flops_max = c.search_flops_max = 0.0
    c.path_sampling = 'uniform'
    c.dropout = 0.0
    c.supernet = search_data.trainer_fields(batch_size=64, steps=300, lr=0.1, weight_decay=5e-4,
                                            image_size=32, augment='crop')
    c.search.update(population=20, generations=6, top_k=5, num_mutations=8, num_crossovers=8)
    if preset == 'nb201_smoke':
      _smoke_scale(c, weight_decay=5e-4)
      c.space = 'nb201-4x1'
  elif preset:
    raise ValueError(f'Unknown preset {preset!r} for spos; presets: {PRESETS}')
  return c
