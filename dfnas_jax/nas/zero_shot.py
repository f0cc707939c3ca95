"""Stage `zero_shot`: data-free zero-shot NAS on NAS-Bench-201.

The data is the teacher's synthetic set (synthesized under WORKDIR/synthesize, or reused;
or the configured `dataset`), split class by class into training images and
`val_per_class` held-out images of each class (`search_data.load`). Then:

1. Score: `num_architectures` cells drawn by `seed` from all 15,625 (<= 0: every one) are
   scored at initialization by each estimator of `estimator` (dfnas_jax.nas.zero_cost)
   through one supernet of size `space` (the benchmark's C=16, N=5 by default: one
   compilation for all cells, one random initialization shared by them), on
   `num_batches` minibatches of `batch_size` training images labelled by the teacher's
   softmax (the batches' mean). Several estimators are combined by their mean rank over
   the drawn cells.
2. Train: the `top_k` cells of that ranking are trained stand-alone, at size `train_space`,
   from scratch by distillation on the training images (the retrain stage, schedule
   `retrain`), and each is evaluated on the held-out images: accuracy against their label,
   the teacher's argmax.
3. Pick: the zero-cost top-1, unless the most accurate on the held-out images beats it by
   more than `pick_z` standard errors of the difference of two accuracies (`pick`): a few
   dozen held-out images cannot tell apart cells of similar accuracy (docs/zero_shot.md).

With `benchmark_table`, each of the top k gets its table accuracy and rank, and the summary
adds the table accuracy of the zero-cost top-1 alone, the best table accuracy among the
drawn cells and the Kendall tau of the ranking with the table over them.

WORKDIR/
  synthesize/                      the synthesize stage's work directory (no `dataset`)
  scores/<estimators>.json         the drawn cells' scores so far (a rerun continues)
  train/<C>x<N>_<cell number>/     retrain stage work directories; a finished one is reused
  scores.png                       with a table: the ranking against the table accuracy
  summary.json
"""
import functools
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from scipy import stats

from dfnas_jax import plots, teachers
from dfnas_jax import workdir as wd
from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.data import nasbench201
from dfnas_jax.models import nb201
from dfnas_jax.nas import cell_scoring, retraining, search_data
from dfnas_jax.nas import zero_cost as zc
from dfnas_jax.train import retrain

COMBINATION = 'mean_rank'  # of several estimators


def estimator_names(config) -> List[str]:
  """config.estimator's estimators (several are combined by their mean rank)."""
  return zc.parse_estimators(config.estimator, 'estimator')


def network_size(config, field: str):
  """(channels, cells per stage) of config.space or config.train_space ('' = space)."""
  name = config[field] or config.space
  expected = (f"{field}={name!r}: expected the size of a NAS-Bench-201 network, 'nb201' "
              "(C=16, N=5) or 'nb201-<C>x<N>', without a cell")
  if not nb201.is_name(name):
    raise ValueError(expected + '.')
  channels, cells, ops = nb201.parse_name(name)
  if ops is not None:
    raise ValueError(expected + ': the stage draws the cells itself.')
  return channels, cells


def cell_number(ops: Sequence[int]) -> int:
  """The cell's op indices as one base-5 number in [0, 15,625), edge 0 most significant."""
  number = 0
  for op in nb201.check(ops):
    number = number * len(nb201.OPS) + op
  return number


def cell_of_number(number: int) -> nb201.Arch:
  digits = []
  for _ in range(nb201.NUM_EDGES):
    number, op = divmod(int(number), len(nb201.OPS))
    digits.append(op)
  return tuple(reversed(digits))


def draw_cells(count: int, seed: int) -> List[nb201.Arch]:
  """`count` distinct cells drawn uniformly by `seed` (<= 0: all, in number order); the
  same with or without a benchmark table."""
  total = nb201.NUM_ARCHITECTURES
  numbers = (range(total) if count <= 0 else
             np.random.default_rng(seed).choice(total, size=count, replace=False))
  return [cell_of_number(n) for n in numbers]


def train_config(config, architecture: str, dataset: str) -> ml_collections.ConfigDict:
  """The retrain stage's config of one top cell: `config.retrain`, distillation from the
  stage's teacher on `dataset`, no real-data evaluation (the held-out images instead)."""
  rc = ml_collections.ConfigDict(config.retrain.to_dict())
  rc.update(stage='retrain', architecture=architecture, dataset=dataset,
            data_dir=config.data_dir, download=config.download, train_split='train',
            loss='distillation', soft_labels=config.soft_labels, teacher=config.teacher,
            teacher_checkpoint=config.teacher_checkpoint, eval_dataset='',
            eval_data_dir=None, eval_split='')
  return rc


def check_config(config) -> None:
  names = estimator_names(config)
  network_size(config, 'space')
  channels, cells = network_size(config, 'train_space')
  count = config.num_architectures if config.num_architectures > 0 else nb201.NUM_ARCHITECTURES
  if count > nb201.NUM_ARCHITECTURES:
    raise ValueError(f'num_architectures={count}: NAS-Bench-201 has '
                     f'{nb201.NUM_ARCHITECTURES} cells (<= 0 scores every one).')
  if not 1 <= config.top_k <= count:
    raise ValueError(f'top_k={config.top_k} must be in [1, num_architectures={count}].')
  for field, size in (('image_size', config.image_size),
                      ('retrain.image_size', config.retrain.image_size)):
    if size < 4 or size % 4:
      raise ValueError(f'{field}={size}: NAS-Bench-201 networks need image sides divisible '
                       'by 4 (two stride-2 reductions).')
  data = set(names) & set(zc.DATA_ESTIMATORS)
  if data:
    if config.batch_size < 2 or config.num_batches < 1:
      raise ValueError(f'batch_size={config.batch_size} and num_batches={config.num_batches}: '
                       'the data estimators need batches of at least 2 images, at least one.')
    if data & set(zc.GROUP_ESTIMATORS):
      zc.check_groups(config.num_groups, config.batch_size)
  retrain.check_config(train_config(config, nb201.architecture_name(
      (0,) * nb201.NUM_EDGES, channels, cells), config.dataset or 'synthetic'))
  if not config.pick_z >= 0:
    raise ValueError(f'pick_z={config.pick_z}: expected >= 0 standard errors (0: the most '
                     'accurate on the held-out images).')
  if config.val_per_class < 1 and not config.train_split:
    raise ValueError(f'val_per_class={config.val_per_class}: the pick needs held-out '
                     'images, at least one per class.')
  search_data.check_search_data(config, 'distillation', config.retrain.augment,
                                config.retrain.image_size, per_class=config.val_per_class)
  if data and not config.dataset:
    s = config.synthesis
    num_classes = teachers.get(config.teacher).num_classes
    kept = s.images_per_round * s.num_rounds - num_classes * config.val_per_class
    check_scoring_images(config, kept)


def check_scoring_images(config, available: int) -> None:
  needed = config.batch_size * config.num_batches
  if needed > available:
    raise ValueError(f'batch_size x num_batches = {needed} scoring images, more than the '
                     f'{available} training images of the data.')


def scoring_batches(config, source: ip.DataSource):
  """[(images, teacher soft labels)] * num_batches: distinct images of `source` in their
  evaluation view, random by seed."""
  check_scoring_images(config, source.num_examples)
  images = cell_scoring.read_images(source, config.image_size, config.retrain.augment)
  rows = np.random.default_rng(config.seed).permutation(len(images))
  return cell_scoring.labelled_batches(
      images, rows, config.batch_size, config.num_batches,
      cell_scoring.teacher_soft_labels(config.teacher, config.teacher_checkpoint))


def score(config, workdir: str, cells: List[nb201.Arch], train: ip.DataSource) -> List[Dict]:
  """Every drawn cell's {'scores': {estimator: score}, 'seconds'}, saved as it goes."""
  names = estimator_names(config)
  data_names = [n for n in names if n in zc.DATA_ESTIMATORS]
  channels, per_stage = network_size(config, 'space')
  num_classes = train.num_classes
  shape = (config.image_size, config.image_size, 3)

  @functools.lru_cache(maxsize=None)
  def network():  # made once, when a cell is left to score
    model = zc.supernet(num_classes, channels, per_stage)
    variables = zc.init_supernet(model, config.seed, shape)
    data, flow = zc.scorer(model, config.num_groups, shape, data_names or zc.DATA_ESTIMATORS)
    return variables, data, flow, scoring_batches(config, train) if data_names else []

  def one(i):
    start = time.time()
    ops = cells[i]
    arch = jnp.asarray(ops, jnp.int32)
    scores = {}
    if data_names or 'synflow' in names:
      variables, data, flow, batches = network()
    if data_names:
      per_batch = [jax.device_get(data(variables, arch, x, p)) for x, p in batches]
      scores.update({k: float(np.mean([s[k] for s in per_batch])) for k in data_names})
    if 'synflow' in names:
      scores['synflow'] = float(flow(variables, arch))
    costs = zc.params_and_flops(ops, num_classes, channels, per_stage)
    scores.update({k: v for k, v in costs.items() if k in names})
    return {'scores': scores, 'seconds': time.time() - start}

  header = {'settings': {k: config[k] for k in (
      'space', 'seed', 'image_size', 'batch_size', 'num_batches', 'num_groups', 'teacher',
      'val_per_class')}}
  path = os.path.join(workdir, 'scores', '+'.join(sorted(names)) + '.json')
  strings = [nb201.arch_to_string(c) for c in cells]
  return cell_scoring.score_cells(path, strings, one, workdir, header)


def ranking(names: Sequence[str], records: List[Dict]) -> np.ndarray:
  """One score per cell, higher better: the estimator's (NaN last), or several's mean rank."""
  columns = {n: [r['scores'][n] for r in records] for n in names}
  return zc.mean_rank(columns) if len(names) > 1 else zc.rankable(columns[names[0]])


def train_cell(config, workdir: str, data: search_data.SearchData,
               ops: nb201.Arch) -> Dict[str, Any]:
  """The retrain stage's summary of cell `ops` trained on the training images and evaluated
  on the held-out ones; a finished training in its directory is reused."""
  channels, cells = network_size(config, 'train_space')
  name = nb201.architecture_name(ops, channels, cells)
  directory = os.path.join(workdir, 'train', f'{channels}x{cells}_{cell_number(ops)}')
  path = os.path.join(directory, 'summary.json')
  if os.path.exists(path):
    summary = wd.read_json(path)
    if (summary['architecture'], summary['num_train_steps']) == (
        name, config.retrain.num_train_steps):
      logging.info('Reused the finished training of %s (%s).', name, directory)
      return summary
  return retrain.run(train_config(config, name, data.dataset), directory,
                     train_source=data.train, eval_source=data.val)


def pick(top: List[Dict], num_heldout: int, z: float) -> Dict:
  """The zero-cost top-1 of `top` (in zero-cost order), or the most held-out-accurate if its
  accuracy is higher by more than z standard errors of the difference (each accuracy a
  binomial proportion over num_heldout images; z = 0: the most accurate)."""
  first = top[0]
  best = top[int(np.argmax([t['heldout_accuracy'] for t in top]))]  # ties: the better rank
  a, b = first['heldout_accuracy'], best['heldout_accuracy']
  standard_error = np.sqrt((a * (1 - a) + b * (1 - b)) / num_heldout)
  return best if b - a > z * standard_error else first


def _table_facts(table: Optional[nasbench201.Table], ops) -> Dict[str, Any]:
  if table is None:
    return {}
  return table.summary_entry(ops) if ops in table else {'benchmark_test_accuracy': None}


def benchmark_statistics(table: nasbench201.Table, cells, combined) -> Dict[str, Any]:
  """The ranking of the drawn cells against the table: Kendall tau over the cells it has,
  the table accuracy of the zero-cost top-1, the best of the drawn cells."""
  rows = [(i, table.test_accuracy_of(c)) for i, c in enumerate(cells) if c in table]
  if not rows:
    return {'cells_in_table': 0}
  index, accuracy = np.array([i for i, _ in rows]), np.array([a for _, a in rows])
  top = int(np.argmax(combined[index]))
  return {'cells_in_table': len(rows),
          'kendall_tau': float(stats.kendalltau(combined[index], accuracy).statistic),
          'zero_cost_top1_test_accuracy': float(accuracy[top]),
          'sample_best_test_accuracy': float(accuracy.max())}


def run(config: ml_collections.ConfigDict, workdir: str):
  check_config(config)  # before the table, the synthesis and any network
  table = nasbench201.load(config.benchmark_table) if config.benchmark_table else None
  names = estimator_names(config)
  data = search_data.load(config, workdir, per_class=config.val_per_class)
  cells = draw_cells(config.num_architectures, config.seed)

  records = score(config, workdir, cells, data.train)
  combined = ranking(names, records)
  order = np.argsort(-combined, kind='stable')[:config.top_k]
  logging.info('Top %d of %d cells by %s:\n%s', len(order), len(cells), ', '.join(names),
               '\n'.join(f'  {k + 1}: {nb201.arch_to_string(cells[i])}'
                         for k, i in enumerate(order)))

  top, finals = [], {}
  for k, i in enumerate(order):
    result = train_cell(config, workdir, data, cells[i])
    finals[str(k)] = result
    top.append({'zero_cost_rank': k + 1, 'benchmark_string': nb201.arch_to_string(cells[i]),
                'ops': list(cells[i]), 'architecture': result['architecture'],
                'scores': records[i]['scores'], 'combined_score': float(combined[i]),
                'heldout_accuracy': result['eval_accuracy'],
                'heldout_loss': result['eval_loss'], 'train_s': round(result['wall_time_s'], 1),
                'model_dir': result['model_dir'], **_table_facts(table, cells[i])})
    logging.info('Trained %d/%d: %s, held-out accuracy %.4f.', k + 1, len(order),
                 top[-1]['benchmark_string'], result['eval_accuracy'])
  best = pick(top, data.val.num_examples, config.pick_z)

  seconds = [r['seconds'] for r in records]
  summary = {
      'stage': 'zero_shot', 'space': config.space,
      'train_space': config.train_space or config.space, 'estimators': names,
      'combination': COMBINATION if len(names) > 1 else None,
      'num_architectures': len(cells), 'top_k': len(top),
      'best_benchmark_string': best['benchmark_string'], 'best_ops': best['ops'],
      'best_architecture': best['architecture'], 'best_scores': best['scores'],
      'best_zero_cost_rank': best['zero_cost_rank'],
      'best_heldout_accuracy': best['heldout_accuracy'], 'pick_z': config.pick_z,
      'heldout_images': data.val.num_examples, 'top': top, **data.info,
      'scoring': {'seconds_per_cell': float(np.mean(seconds[1:] or seconds)),
                  'first_cell_seconds': seconds[0], 'batch_size': config.batch_size,
                  'num_batches': config.num_batches},
      'wall_time_s': retraining.wall_times(
          {'data_s': data.seconds, 'scoring_s': float(np.sum(seconds))}, finals),
  }
  if table is not None:
    summary.update(_table_facts(table, best['ops']))
    summary['benchmark'] = benchmark_statistics(table, cells, combined)
    known = [i for i, c in enumerate(cells) if c in table]
    if jax.process_index() == 0 and known:
      shown = combined[known]
      plots.rank_scatter(
          {'drawn cells': (np.array([table.test_accuracy_of(cells[i]) for i in known]),
                           np.where(np.isfinite(shown), shown, np.nan),
                           f"tau {summary['benchmark']['kendall_tau']:+.2f}")},
          'table test accuracy (%)', ' + '.join(names), os.path.join(workdir, 'scores.png'))
  wd.write_summary(workdir, summary)
  return summary
