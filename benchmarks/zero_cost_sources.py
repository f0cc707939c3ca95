"""What the zero-cost study's data sources give a ranking: the teacher's labels and the images.

For each source of `configs/zero_cost_study.py` (the same batches the study scores, drawn
by its seed), one row per batch:
  distinct classes   of the teacher's argmax labels in the batch
  effective classes  exp(entropy of the batch's mean soft label): 10 if balanced, 1 if one
  confidence         the teacher's mean top probability
  label kernel       the off-diagonal spread of P P^T (P the soft labels) over its mean:
                     0 when every image gets the same label vector
  pixel/label CKA    centred alignment of the images' Gram matrix with P P^T (as
                     `teacher_cka` aligns a network's ReLU-code kernel with it): whether
                     images the teacher labels alike are alike in pixel space

  python benchmarks/zero_cost_sources.py --workdir=/tmp/zc_sources \
    --config=configs/zero_cost_study.py --config.seed=2 \
    --config.sources=full,deepinversion,noise,real_same_count,real \
    --config.real_dataset=cifar10_jpeg --config.real_data_dir=/path/to/tfds \
    --config.real_train_split='train[:45000]' --config.download=False \
    [--config.synthetic_datasets=full=DIR]   # reuse a study's set instead of synthesizing

The synthetic sets are made (or reused) as the study makes them, under WORKDIR/data.
Results: docs/zero_shot.md.
"""
import json

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dfnas_jax.evaluation import zero_cost_study as study
from dfnas_jax.nas import zero_cost as zc

FLAGS = flags.FLAGS


def structure(images: np.ndarray, soft_labels: np.ndarray) -> dict:
  """The columns above for one batch."""
  p = np.asarray(soft_labels, np.float64)
  mean = p.mean(0)
  labels = p @ p.T
  off = labels[~np.eye(len(p), dtype=bool)]
  flat = np.asarray(images, np.float64).reshape(len(images), -1)
  flat = flat - flat.mean(0)
  return {
      'distinct_classes': int(len(np.unique(p.argmax(1)))),
      'effective_classes': float(np.exp(-np.sum(mean * np.log(mean + 1e-12)))),
      'confidence': float(p.max(1).mean()),
      'label_kernel_spread': float(off.std() / off.mean()),
      'pixel_label_cka': float(zc.cka_score(flat @ flat.T, labels)),
  }


def main(argv):
  del argv
  config = FLAGS.config
  sources = study.Sources(config, FLAGS.workdir)
  rows = {}
  for name in study.source_names(config):
    per_batch = [structure(x, p) for x, p in sources.batches(name)]
    rows[name] = {k: float(np.mean([b[k] for b in per_batch])) for k in per_batch[0]}
  print('| source | distinct classes | effective classes | confidence | label kernel spread '
        '| pixel/label CKA |')
  print('|---|---|---|---|---|---|')
  for name, r in rows.items():
    print(f"| {name} | {r['distinct_classes']:.1f} | {r['effective_classes']:.2f} | "
          f"{r['confidence']:.2f} | {r['label_kernel_spread']:.2f} | "
          f"{r['pixel_label_cka']:+.3f} |")
  print(json.dumps(rows))


if __name__ == '__main__':  # flags defined only when run: tests import this file
  config_flags.DEFINE_config_file('config', None, 'A zero_cost_study config.')
  flags.DEFINE_string('workdir', None, 'Where the synthetic sets are made (data/<source>).')
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
