"""Stage `zero_cost_study`: do training-free estimators rank NAS-Bench-201 cells on synthetic data
as they do on real data?

K cells drawn from the benchmark table by seed (all 15,625 with num_architectures <= 0) are
scored at initialization by the estimators of `dfnas_jax.nas.zero_cost` that `estimators`
names (every one by default; fewer run only the passes those read), through one
supernet (one compilation for every cell, one random initialization shared by all), on
`num_batches` minibatches of `batch_size` images from each data source:

  full, deepinversion   synthetic sets of the synthesize stage (as rank_correlation makes
                        them), each image's centre window
  noise                 uniform noise, as many images as a synthetic set
  real_same_count       as many real images as a synthetic set, class-balanced
  real                  the whole real training split

Every image is labelled by the teacher's softmax. synflow, params and flops read no data
(source 'none'). Each ranking is compared with the table's 200-epoch test accuracy:
Kendall's tau and Spearman's rho with bootstrap intervals, the top-1 and top-10 picks' table
accuracy (rank_correlation.rank_statistics).

WORKDIR/
  data/<variant>/   synthesize stage work directories
  cells.json        the scores so far (a rerun continues after the last saved cell)
  results.json      benchmark_strings, test_accuracy, scores[estimator][source] (mean over
                    batches), spread (their std), statistics, size_and_data (how much
                    of each ranking the parameter count and the images explain), seconds
                    per cell
  results.md, scatter_<estimator>.png
"""
import os
import time
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import stats

from dfnas_jax import plots, teachers
from dfnas_jax import workdir as wd
from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.data import nasbench201
from dfnas_jax.evaluation import rank_correlation
from dfnas_jax.models import nb201
from dfnas_jax.nas import cell_scoring, search_data
from dfnas_jax.nas import zero_cost as zc
from dfnas_jax.synthesis import synthesize

SYNTHETIC = {'full': rank_correlation.VARIANTS['full'],
             'deepinversion': rank_correlation.VARIANTS['deepinversion']}
SOURCES = (*SYNTHETIC, 'noise', 'real_same_count', 'real')
NO_DATA = 'none'  # the source of the estimators that read no images
SAVE_EVERY = 20   # cells between saves of cells.json


def source_names(config) -> List[str]:
  names = [s.strip() for s in config.sources.split(',') if s.strip()]
  unknown = [s for s in names if s not in SOURCES]
  if unknown or not names:
    raise ValueError(f'sources={config.sources!r}: each must be one of {SOURCES}.')
  return names


def check_config(config) -> None:
  channels, cells, ops = nb201.parse_name(config.space)
  if ops is not None:
    raise ValueError(f"space={config.space!r} names one cell; the study scores the table's "
                     "cells through the supernet: 'nb201' or 'nb201-<C>x<N>'.")
  if not config.benchmark_table:
    raise ValueError('The study needs benchmark_table: the NAS-Bench-201 results table '
                     '(docs/nasbench201_table.md).')
  if config.batch_size % config.num_groups or config.num_groups < 2:
    raise ValueError(f'num_groups={config.num_groups} must be >= 2 and divide '
                     f'batch_size={config.batch_size}.')
  if config.num_batches < 1:
    raise ValueError(f'num_batches must be >= 1, got {config.num_batches}.')
  names = source_names(config)
  zc.parse_estimators(config.estimators)
  search_data.reused_datasets(config, list(SYNTHETIC))
  if any(s in SYNTHETIC for s in names):
    search_data.check_synthesis(search_data.synthesis_config(config), False, 'crop',
                                config.image_size)
  needed = config.batch_size * config.num_batches
  for name in set(names) - {'real'}:
    if needed > pool_size(config, name):
      raise ValueError(f'num_batches x batch_size = {needed} images, more than the '
                       f'{pool_size(config, name)} source {name!r} holds.')


def num_synthetic(config) -> int:
  return config.synthesis.images_per_round * config.synthesis.num_rounds


def pool_size(config, name: str) -> int:
  """How many images source `name` (not 'real') draws its batches from: a synthetic set's
  count, and as many real images per class as a whole share of it gives."""
  if name == 'real_same_count':
    num_classes = teachers.get(config.teacher).num_classes
    return num_classes * max(1, num_synthetic(config) // num_classes)
  return num_synthetic(config)


class Sources:
  """Each source's minibatches and their teacher soft labels, made once."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self._soft_labels = cell_scoring.teacher_soft_labels(config.teacher,
                                                         config.teacher_checkpoint)
    self._real = None
    self._reused = search_data.reused_datasets(config, list(SYNTHETIC))

  def _real_split(self):
    c = self.config
    if self._real is None:
      whole = ip.get_source(c.real_dataset, c.real_train_split, c.real_data_dir, c.download)
      self._real = whole, ip.read_column(whole, search_data.class_feature(whole))
    return self._real

  def pool(self, name: str, rng: np.random.Generator) -> np.ndarray:
    """The images the batches of `name` are drawn from ([N, H, W, 3] in [0, 1])."""
    c = self.config
    needed = c.batch_size * c.num_batches
    if name in SYNTHETIC:
      directory = self._reused.get(name)
      if directory is None:
        sc = search_data.synthesis_config(c)
        sc.update(SYNTHETIC[name])
        directory = synthesize.load_or_run(
            sc, os.path.join(self.workdir, 'data', name))['dataset_dir']
      return cell_scoring.read_images(ip.get_source(directory, 'train'), c.image_size, 'crop')
    if name == 'noise':
      return rng.uniform(size=(num_synthetic(c), c.image_size, c.image_size, 3)).astype(
          np.float32)
    whole, labels = self._real_split()
    if name == 'real_same_count':  # as rank_correlation draws them
      rows = search_data.class_balanced_rows(labels, c.seed, per_class=pool_size(
          c, name) // whole.num_classes)[1]
    else:  # only the drawn batches are read: the pool is the whole split
      rows = rng.choice(len(labels), needed, replace=False)
    return cell_scoring.read_images(ip.subset(whole, rows), c.image_size, 'none')

  def batches(self, name: str):
    """[(images, soft labels)] * num_batches, distinct images, random by seed and source."""
    c = self.config
    rng = np.random.default_rng([c.seed, SOURCES.index(name)])
    pool = self.pool(name, rng)
    return cell_scoring.labelled_batches(pool, rng.permutation(len(pool)), c.batch_size,
                                         c.num_batches, self._soft_labels)


def _statistics(scores, truth, config) -> Dict:
  stat = rank_correlation.rank_statistics(zc.rankable(scores), truth, config.num_bootstrap,
                                          config.seed)
  top = np.argsort(-zc.rankable(scores), kind='stable')[:10]
  stat['top10_mean_accuracy'] = float(np.mean(np.asarray(truth)[top]))
  stat['top10_best_accuracy'] = float(np.max(np.asarray(truth)[top]))
  return stat


def _tau(a, b) -> float:
  return float(stats.kendalltau(a, b).statistic)


def size_and_data(scores: np.ndarray, truth: np.ndarray, params: np.ndarray,
                  noise: Optional[np.ndarray] = None) -> Dict[str, float]:
  """How much of a ranking is the cells' size, and how much the images.

  with_params: Kendall tau of the scores with the parameter count.
  partial_given_params: Kendall's partial tau of scores and truth given the count.
  within_equal_params: tau against the truth inside each group of cells with the same count,
    the mean over groups weighted by their pairs: the pairs the count cannot order.
  with_noise: tau with the same estimator's scores on noise (1: the images change nothing).
  """
  scores, truth, params = (zc.rankable(x) for x in (scores, truth, params))
  txy, txz, tyz = _tau(scores, truth), _tau(scores, params), _tau(truth, params)
  weighted = pairs = 0.
  for count in np.unique(params):
    group = params == count
    if np.ptp(scores[group]) > 0 and np.ptp(truth[group]) > 0:  # tau defined
      n = group.sum() * (group.sum() - 1) / 2
      weighted, pairs = weighted + n * _tau(scores[group], truth[group]), pairs + n
  spread = (1 - txz**2) * (1 - tyz**2)  # 0: one ranking is the count's, partial undefined
  result = {'with_params': txz,
            'partial_given_params': (txy - txz * tyz) / np.sqrt(spread) if spread else np.nan,
            'within_equal_params': weighted / pairs if pairs else np.nan}
  if noise is not None:
    result['with_noise'] = _tau(scores, zc.rankable(noise))
  return {k: float(v) for k, v in result.items()}


def breakdown(results: Dict) -> Dict[str, Dict[str, Dict[str, float]]]:
  """size_and_data for every estimator and source of a study's results (those of `run`,
  or the columnar JSON under docs/zero_shot/); {} without the parameter count."""
  scores = results['scores']
  if NO_DATA not in scores.get('params', {}):
    return {}
  params, truth = scores['params'][NO_DATA], results['test_accuracy']
  return {e: {s: size_and_data(v, truth, params,
                               per.get('noise') if s not in ('noise', NO_DATA) else None)
              for s, v in per.items()}
          for e, per in scores.items() if e != 'params'}


def run(config: ml_collections.ConfigDict, workdir: str):
  start = time.time()
  check_config(config)
  names = source_names(config)
  channels, cells_per_stage, _ = nb201.parse_name(config.space)
  table = nasbench201.load(config.benchmark_table)
  count = len(table) if config.num_architectures <= 0 else config.num_architectures
  rows = table.sample(min(count, len(table)), config.seed)
  strings = [nb201.arch_to_string(table.archs[r]) for r in rows]
  truth = [float(table.test_accuracy[r]) / 100 for r in rows]

  estimators = zc.parse_estimators(config.estimators)
  data_estimators = [e for e in estimators if e in zc.DATA_ESTIMATORS]
  if not data_estimators:  # nothing reads the images
    names = []
  sources = Sources(config, workdir)
  batches = {name: sources.batches(name) for name in names}
  shape = (config.image_size, config.image_size, 3)
  model = zc.supernet(10, channels, cells_per_stage)
  variables = zc.init_supernet(model, config.seed, shape)
  data, flow = zc.scorer(model, config.num_groups, shape,
                         data_estimators or zc.DATA_ESTIMATORS)

  def score(i):
    ops = table.archs[rows[i]]
    arch = jnp.asarray(ops, jnp.int32)
    began = time.time()
    cell = {'seconds': {}, 'scores': {}}
    for name in names:
      t = time.time()
      per_batch = [jax.device_get(data(variables, arch, images, p)) for images, p in batches[name]]
      cell['scores'][name] = {k: [float(s[k]) for s in per_batch] for k in data_estimators}
      cell['seconds'][name] = time.time() - t
    t = time.time()
    no_data = {k: [v] for k, v in zc.params_and_flops(ops, 10, channels,
                                                       cells_per_stage).items()}
    if 'synflow' in estimators:
      no_data['synflow'] = [float(flow(variables, arch))]
    no_data = {k: v for k, v in no_data.items() if k in estimators}
    if no_data:
      cell['scores'][NO_DATA] = no_data
    cell['seconds'][NO_DATA] = time.time() - t
    cell['seconds']['total'] = time.time() - began
    return cell

  header = {'estimators': estimators, 'sources': names, 'settings': {k: config[k] for k in (
      'space', 'seed', 'image_size', 'batch_size', 'num_batches', 'num_groups', 'teacher')}}
  done = cell_scoring.score_cells(os.path.join(workdir, 'cells.json'), strings, score,
                                  workdir, header, save_every=SAVE_EVERY)

  scores: Dict[str, Dict[str, List[float]]] = {}
  spread: Dict[str, Dict[str, List[float]]] = {}
  for name in done[0]['scores']:
    for estimator in done[0]['scores'][name]:
      values = np.array([c['scores'][name][estimator] for c in done], np.float64)
      scores.setdefault(estimator, {})[name] = values.mean(1).tolist()
      spread.setdefault(estimator, {})[name] = values.std(1).tolist()
  statistics = {e: {s: _statistics(v, truth, config) for s, v in per.items()}
                for e, per in scores.items()}
  # The first cell's time is mostly compilation.
  seconds = {s: float(np.mean([c['seconds'][s] for c in done[1:]] or [np.nan]))
             for s in [*names, NO_DATA, 'total']}
  results = {
      'stage': 'zero_cost_study', 'space': config.space, 'benchmark_table': table.path,
      'benchmark_strings': strings, 'benchmark_indices': [int(table.indices[r]) for r in rows],
      'test_accuracy': truth, 'ground_truth': 'NAS-Bench-201 CIFAR-10 test accuracy, 200 epochs',
      'scores': scores, 'spread': spread, 'statistics': statistics,
      'batch_size': config.batch_size, 'num_batches': config.num_batches,
      'num_groups': config.num_groups, 'seconds_per_cell': seconds,
      'first_cell_seconds': done[0]['seconds']['total'],
      'wall_time_s': round(time.time() - start, 1),
  }
  results['size_and_data'] = breakdown(results)
  if jax.process_index() == 0:
    wd.write_json(os.path.join(workdir, 'results.json'), results)
    wd.atomic_write_bytes(os.path.join(workdir, 'results.md'), markdown(results).encode())
    for estimator, per in scores.items():
      panels = {s: (np.asarray(truth), zc.rankable(v),
                    f"tau {statistics[estimator][s]['kendall_tau']:+.2f}")
                for s, v in per.items()}
      plots.rank_scatter(panels, 'table test accuracy', estimator,
                         os.path.join(workdir, f'scatter_{estimator}.png'))
  summary = {'stage': 'zero_cost_study', 'num_architectures': len(rows),
             'wall_time_s': results['wall_time_s'], 'seconds_per_cell': seconds['total'],
             'kendall_tau': {e: {s: st['kendall_tau'] for s, st in per.items()}
                             for e, per in statistics.items()}}
  wd.write_summary(workdir, summary)
  return summary


def markdown(results: Dict) -> str:
  """One row per estimator and source: tau, rho, the picks' table accuracy."""
  lines = [f"{len(results['benchmark_strings'])} cells; truth: {results['ground_truth']}; "
           f"best of them {100 * max(results['test_accuracy']):.2f}%.", '',
           '| estimator | data | Kendall tau [95% CI] | Spearman rho [95% CI] | top-1 acc. '
           '| top-10 mean / best |', '|---|---|---|---|---|---|']
  for estimator, per in results['statistics'].items():
    for source, s in per.items():
      lines.append(
          f"| {estimator} | {source} | {rank_correlation._interval(s, 'kendall_tau')} | "
          f"{rank_correlation._interval(s, 'spearman_rho')} | "
          f"{100 * s['top1_real_accuracy']:.2f}% | {100 * s['top10_mean_accuracy']:.2f}% / "
          f"{100 * s['top10_best_accuracy']:.2f}% |")
  if results.get('size_and_data'):
    lines += ['', breakdown_markdown(results['size_and_data'])]
  seconds = results['seconds_per_cell']
  lines += ['', 'Seconds per cell: ' + ', '.join(f'{k} {v:.2f}' for k, v in seconds.items()),
            '']
  return '\n'.join(lines)


def breakdown_markdown(size_and_data: Dict) -> str:
  """breakdown's table: one row per estimator and source."""
  fmt = lambda row, k: f'{row[k]:+.2f}' if k in row and np.isfinite(row[k]) else '-'
  keys = ('with_params', 'partial_given_params', 'within_equal_params', 'with_noise')
  lines = ['| estimator | data | tau with params | partial tau given params '
           '| tau within equal params | tau with itself on noise |', '|---|---|---|---|---|---|']
  for estimator, per in size_and_data.items():
    for source, row in per.items():
      lines.append(f'| {estimator} | {source} | ' + ' | '.join(fmt(row, k) for k in keys) + ' |')
  return '\n'.join(lines)
