"""Data-free ProxylessNAS: synthesize -> latency-aware binary-gate search -> retrain -> evaluate.

  python -m dfnas_jax.main --config=configs/proxylessnas.py           # reduced scale, 2 CPU cores
  python -m dfnas_jax.main --config=configs/proxylessnas.py:imagenet  # the reference's scale
  python -m dfnas_jax.main --config=configs/proxylessnas.py:smoke     # CI

The default searches an 11-layer space at 32 px. Latencies are measured on the
backend the search runs on (cached in WORKDIR/latency_table.json); cost_model=flops
uses the analytic FLOPs table instead, cost_model=none searches for accuracy only.
Real-data evaluation of the retrained network, offline copy of CIFAR-10:
  --config.eval_dataset=cifar10_jpeg --config.eval_data_dir=/path/to/tfds \
  --config.eval_split='train[45000:]'
Search on real data with hard labels instead (the comparison experiments):
  --config.dataset=cifar10_jpeg --config.data_dir=... --config.train_split='train[:40000]' \
  --config.val_split='train[40000:45000]' --config.loss=cross_entropy --config.augment=cifar \
  --config.retrain.augment=cifar
"""
import ml_collections

from dfnas_jax.configs import search_data
from dfnas_jax.configs import synthesize as synthesize_config

PRESETS = ('', 'smoke', 'imagenet')


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = 'proxylessnas'
  search_data.add_teacher_and_data(c)
  c.val_per_class = 8            # held out from the synthetic set for architecture steps
  c.train_split = ''             # explicit splits override val_per_class (real data)
  c.val_split = ''
  c.loss = 'distillation'        # | cross_entropy (hard labels, real data)
  c.soft_labels = 'teacher'      # teacher: recomputed per augmented batch | stored
  c.temperature = 3.0

  # Supernet weights (dfnas_jax.models.proxyless.SPACES) and their SGD.
  c.space = 'proxyless_cifar'
  c.augment = 'crop'
  c.batch_size = 16
  c.warmup_epochs = 5            # weight steps only, paths from the initial (uniform) alphas
  c.num_epochs = 10              # search epochs after the warm-up
  c.learning_rate = 0.1          # cosine over the warm-up, then again over the search
  c.warmup_learning_rate = 0.0   # the warm-up's peak; <= 0: learning_rate (reference: 0.05)
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 4e-5
  c.decay_all_weights = False    # False: kernels only; the reference decays every weight (True)
  c.bn_epsilon = 1e-5            # reference: 1e-3
  c.dropout = 0.0

  # Architecture: binary gates, Adam. The reference updates every 5 weight steps at
  # lr 1e-3 over thousands of steps; this CPU-sized run has ~100 architecture steps.
  c.binary_mode = 'two'          # two sampled paths per layer | full (every candidate computed)
  c.arch_update_every = 2        # one architecture step every N weight steps
  c.arch_start_epoch = 0         # search epochs before the first one (reference: 1)
  c.arch_learning_rate = 1e-2
  c.arch_b1, c.arch_b2 = 0.0, 0.999
  c.arch_weight_decay = 0.0
  c.arch_init_std = 1e-3

  # Hardware-aware loss.
  c.cost_model = 'latency'       # | flops | none
  c.cost_loss = 'mul_log'        # alpha * L * (log E[cost] / log target)^beta | add_linear
  c.cost_target = 0.0            # in the table's unit (ms or MFLOPs); <= 0: the fraction below
  c.cost_target_fraction = 0.8   # of the expected cost of the uniform distribution
  c.mul_log_alpha, c.mul_log_beta = 0.2, 0.3
  c.add_linear_lambda = 0.1
  c.latency_batch_size = 32      # latencies are per forward pass of this many images
  c.latency_repeats = 10
  c.latency_cache = ''           # '' = WORKDIR/latency_table.json

  c.calibration_batches = 4      # BN recalibration before scoring the argmax architecture
  c.log_every_steps = 20
  c.checkpoint_every_steps = 50
  c.keep_checkpoints = 2

  search_data.add_retraining(c, batch_size=32, num_train_steps=300, learning_rate=0.05,
                             weight_decay=4e-5, warmup_epochs=0.0, checkpoint_every_steps=50)

  search_data.add_real_evaluation(c)
  search_data.add_retraining_data(c)

  if preset == 'smoke':
    c.synthesis = synthesize_config.get_config('smoke')
    c.val_per_class = 1
    c.space = 'proxyless_tiny'
    c.batch_size = 4
    c.warmup_epochs, c.num_epochs, c.arch_update_every = 1, 1, 2
    c.latency_batch_size, c.latency_repeats = 4, 3
    c.calibration_batches = 1
    c.log_every_steps = c.checkpoint_every_steps = 2
    search_data.add_retraining(c, 'smoke')
    c.eval_split = 'test[:64]'
  elif preset == 'imagenet':
    c.teacher = 'resnet50'
    c.synthesis = synthesize_config.get_config('imagenet')
    c.val_per_class = 8            # of the 10 per class: the SPOS reference's (ProxylessNAS
                                   # holds out 50,000 real images)
    c.space = 'proxyless_imagenet'
    c.augment = 'imagenet'
    c.batch_size = 256
    c.warmup_epochs, c.num_epochs = 40, 120
    c.learning_rate, c.warmup_learning_rate = 0.025, 0.05
    c.decay_all_weights, c.bn_epsilon = True, 1e-3
    c.arch_update_every, c.arch_learning_rate, c.arch_start_epoch = 5, 1e-3, 1
    c.calibration_batches = 50
    c.latency_batch_size = 1
    c.log_every_steps, c.checkpoint_every_steps = 100, 1000
    c.retrain.image_size, c.retrain.augment = 224, 'imagenet'
    c.retrain.batch_size, c.retrain.num_epochs, c.retrain.num_train_steps = 1024, 300.0, -1
    c.retrain.learning_rate, c.retrain.weight_decay = 0.4, 4e-5
    c.retrain.label_smoothing = 0.1
    c.retrain.checkpoint_every_steps = 2000
    c.eval_dataset, c.eval_split = 'imagenet2012', 'validation'
    c.real_dataset, c.real_augment = 'imagenet2012', 'imagenet'
  elif preset:
    raise ValueError(f'Unknown preset {preset!r} for proxylessnas; presets: {PRESETS}')
  return c
