"""Data-free DARTS: synthesize -> bilevel cell search -> retrain the genotype -> evaluate.

  python -m dfnas_jax.main --config=configs/darts.py          # reduced scale, 2 CPU cores
  python -m dfnas_jax.main --config=configs/darts.py:cifar10  # the reference's scale
  python -m dfnas_jax.main --config=configs/darts.py:smoke    # CI
  python -m dfnas_jax.main --config=configs/darts.py:nb201 --config.benchmark_table=cifar10.json

The default searches at reduced scale (8 channels, 3 cells, 16 px, batch 16) so a
CPU finishes; the search network is then a quarter of the reference's depth.
Real-data evaluation of the retrained network, offline copy of CIFAR-10:
  --config.eval_dataset=cifar10_jpeg --config.eval_data_dir=/path/to/tfds \
  --config.eval_split='train[45000:]'
Search on real data with hard labels instead (the comparison experiments):
  --config.dataset=cifar10_jpeg --config.data_dir=... --config.train_split='train[:22500]' \
  --config.val_split='train[22500:45000]' --config.loss=cross_entropy --config.augment=cifar \
  --config.retrain.augment=cifar
"""
import ml_collections

from dfnas_jax.configs import search_data
from dfnas_jax.configs import synthesize as synthesize_config

PRESETS = ('', 'smoke', 'cifar10', 'nb201', 'nb201_smoke')


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = 'darts'
  search_data.add_teacher_and_data(c)
  c.train_split = ''             # '' = half of each class (weights) / the rest (architecture)
  c.val_split = ''
  c.loss = 'distillation'        # | cross_entropy (hard labels, real data)
  # teacher: its logits on each trained view (at its own input size) | stored: the dataset's,
  # which label each canvas's centre window only (for window-sized images, augment='none').
  c.soft_labels = 'teacher'
  c.temperature = 3.0

  # Search space: 'darts' (the reference's cells) or a NAS-Bench-201 network 'nb201',
  # 'nb201-<C>x<N>' (one cell of 6 mixed edges; the result is the argmax op per edge,
  # retrained at that size). init_channels/layers/retrain_network are DARTS's.
  c.space = 'darts'
  c.benchmark_table = ''         # NAS-Bench-201 results: the found cell's accuracy and rank

  # Search network and bilevel optimization (reference values unless noted).
  c.mode = 'exact'               # exact second order | first_order | finite_difference
  c.init_channels = 8            # reference 16
  c.layers = 3                   # reference 8 cells
  c.image_size = 16              # reference 32: the synthetic images resized
  c.augment = 'none'             # the whole canvas, resized
  c.batch_size = 16              # reference 64
  c.num_epochs = 5               # reference 50
  c.learning_rate = 0.025
  c.learning_rate_min = 0.001
  c.momentum = 0.9
  c.weight_decay = 3e-4           # on kernels; the reference decays every parameter (here that
                                 # is only the classifier's bias: the search BN has none)
  c.grad_clip = 5.0
  c.arch_learning_rate = 3e-4     # Adam, betas (arch_b1, arch_b2), as the reference
  c.arch_b1, c.arch_b2 = 0.5, 0.999
  c.arch_weight_decay = 1e-3
  # mode='finite_difference': the weights move +- radius / ||grad_w' L_val|| (reference 0.01).
  c.finite_difference_radius = 0.01
  c.log_every_steps = 12
  c.checkpoint_every_steps = 12
  c.keep_checkpoints = 2

  # The network retrained from the genotype, and its training (configs/retrain.py fields).
  c.retrain_network = ml_collections.ConfigDict(dict(
      init_channels=12, layers=5, auxiliary=False, drop_path=0.0))
  # The reference's retraining: plain momentum, gradients clipped at norm 5. Its drop-path
  # rate ramps up linearly over training; here retrain_network.drop_path is constant.
  # aux_weight: used when retrain_network.auxiliary.
  search_data.add_retraining(c, batch_size=32, num_train_steps=150, learning_rate=0.05,
                             weight_decay=3e-4, warmup_epochs=0.0, nesterov=False, grad_clip=5.0,
                             checkpoint_every_steps=50, aux_weight=0.4)

  search_data.add_real_evaluation(c)
  search_data.add_retraining_data(c)

  if preset == 'smoke':
    c.synthesis = synthesize_config.get_config('smoke')
    c.init_channels, c.layers, c.image_size, c.batch_size = 2, 3, 8, 4
    c.num_epochs = 2
    c.log_every_steps = c.checkpoint_every_steps = 2
    c.retrain_network.update(init_channels=4, layers=3, auxiliary=True, drop_path=0.2)
    search_data.add_retraining(c, 'smoke', aux_weight=0.4)
    c.eval_split = 'test[:64]'
  elif preset == 'cifar10':
    c.synthesis.images_per_round, c.synthesis.num_rounds = 256, 100   # 25,600 images
    c.init_channels, c.layers, c.image_size, c.batch_size = 16, 8, 32, 64
    c.augment, c.num_epochs = 'crop', 50
    c.log_every_steps, c.checkpoint_every_steps = 50, 200
    c.retrain_network.update(init_channels=36, layers=20, auxiliary=True, drop_path=0.2)
    c.retrain.batch_size, c.retrain.num_epochs, c.retrain.num_train_steps = 96, 600.0, -1
    c.retrain.learning_rate, c.retrain.lr_schedule = 0.025, 'cosine'
    c.retrain.checkpoint_every_steps = 1000
  elif preset in ('nb201', 'nb201_smoke'):
    c.space = 'nb201-8x1'
    c.image_size, c.augment = 32, 'crop'
    c.batch_size, c.num_epochs = 32, 20
    c.log_every_steps = c.checkpoint_every_steps = 6
    c.retrain.batch_size, c.retrain.num_train_steps = 64, 300
    c.retrain.weight_decay = 5e-4
    if preset == 'nb201_smoke':
      c.synthesis = synthesize_config.get_config('smoke')
      c.space, c.batch_size, c.num_epochs = 'nb201-4x1', 4, 2
      c.log_every_steps = c.checkpoint_every_steps = 2
      search_data.add_retraining(c, 'smoke')
      c.eval_split = 'test[:64]'
  elif preset:
    raise ValueError(f'Unknown preset {preset!r} for darts; presets: {PRESETS}')
  return c
