"""Data-free zero-shot NAS on NAS-Bench-201 (dfnas_jax.nas.zero_shot): score cells at
initialization on synthetic images, train the best few briefly, keep the best of those.

  python -m dfnas_jax.main --config=configs/zero_shot.py
  python -m dfnas_jax.main --config=configs/zero_shot.py:smoke   # tests, about a minute
  python -m dfnas_jax.main --config=configs/zero_shot.py \
    --config.benchmark_table=/path/to/nasbench201/cifar10.json    # + the picks' table accuracy

Report: docs/zero_shot.md. A rerun with the same work directory continues: saved scores are
read back and finished trainings reused.
"""
import ml_collections

from dfnas_jax.configs import search_data
from dfnas_jax.configs import synthesize as synthesize_config

PRESETS = ('', 'smoke')


def get_config(preset: str = '') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = 'zero_shot'
  search_data.add_teacher_and_data(c)  # seed: also draws the cells and the scoring batches
  del c['compute_dtype']               # the networks here run in float32
  # Held out from the synthetic set to pick among the trained cells (accuracy against each
  # image's label, the teacher's argmax); explicit splits instead for real data.
  c.val_per_class = 5
  c.train_split = ''
  c.val_split = ''
  c.soft_labels = 'teacher'            # distillation targets: teacher (each crop) | stored

  # Scoring: the cells drawn from all 15,625 (<= 0: every one), the network that scores them
  # (the benchmark's C=16, N=5 as the published correlations; 'nb201-<C>x<N>' smaller) and
  # the estimators (dfnas_jax.nas.zero_cost.ESTIMATORS): several are combined by their mean
  # rank. jacob_cov on synthetic images + synflow + params: the best combination over the
  # study's 200 cells (docs/zero_shot.md).
  c.num_architectures = 500
  c.space = 'nb201'
  c.image_size = 32
  c.estimator = 'jacob_cov,synflow,params'
  c.batch_size = 64
  c.num_batches = 1                    # scores: their mean
  c.num_groups = 2                     # of each batch, for zico and teacher_agreement

  # The top_k cells trained stand-alone by distillation, at the size train_space ('' = space).
  c.top_k = 3
  c.train_space = 'nb201-8x1'
  search_data.add_retraining(c, batch_size=64, num_train_steps=300, learning_rate=0.1,
                             warmup_epochs=0.0, weight_decay=5e-4, eval_every_steps=10 ** 9,
                             checkpoint_every_steps=100)
  # The pick: the zero-cost top-1 unless a trained cell's held-out accuracy beats it by more
  # than pick_z standard errors (0: the most accurate; 50 held-out images cannot separate
  # the top cells, docs/zero_shot.md).
  c.pick_z = 2.0

  c.benchmark_table = ''               # NAS-Bench-201 results: the picks' table accuracy

  if preset == 'smoke':
    c.synthesis = synthesize_config.get_config('smoke')
    c.val_per_class = 1
    c.num_architectures, c.top_k = 6, 2
    c.space, c.train_space = 'nb201-2x1', ''
    c.batch_size = 8
    search_data.add_retraining(c, 'smoke', eval_every_steps=10 ** 9)
    c.retrain.checkpoint_every_steps = 2
  elif preset:
    raise ValueError(f'Unknown preset {preset!r} for zero_shot; presets: {PRESETS}')
  return c
