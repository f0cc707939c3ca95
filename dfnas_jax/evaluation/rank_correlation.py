"""Stage `rank_correlation`: does synthetic data rank architectures the way real data does?

The paper's consistency analysis. K architectures of a SPOS space (or random
DARTS genotypes, space='darts') are fixed by seed, spread over the space by
FLOPs (DARTS: by their number of convolutions). Ground truth: each is trained from
scratch on real data (hard labels) and evaluated on a real held-out split.
Then, for each data variant (the full method, its ablations, plain
DeepInversion, teacher-labelled Gaussian noise; all the same size):

  stand-alone: each architecture is trained by distillation on the variant
               (same schedule) and evaluated on the real held-out split;
  one-shot:    one supernet is trained on the variant and the K subnets are
               ranked by BN-recalibrated accuracy on the variant's own held-out
               images (what the SPOS search uses).

Each ranking is compared with the ground truth: Kendall's tau and Spearman's
rho with bootstrap 95% intervals over architectures, the top-10% precision, and
the regret of the variant's top-1 pick (best real accuracy minus that of the pick).

On NAS-Bench-201 (space='nb201[-CxN]', benchmark_table=PATH) the ground truth is
the published 200-epoch CIFAR-10 test accuracy of K cells drawn from the table
by seed: nothing is trained on real data for it. The one-shot ranking is then
also made by supernets trained on real images (`REAL_VARIANTS`: as many as the
synthetic sets hold, or the whole real split) with the teacher's soft labels, and
the table's own 12-epoch validation accuracy is reported as a cheap real proxy.
The optional stand-alone version trains the first `stand_alone_architectures` of
the K cells at the proxy's size: on real data with hard labels (the row `real`,
a ranking like any other here), by distillation on each synthetic variant and,
with `real_same_count` among the variants, by the same distillation on as many
real images as a synthetic variant has.
Whether short stand-alone training at that size ranks the cells is what tells a
failing supernet's weight sharing apart from its small network and budget.

WORKDIR/
  architectures.json           the K architectures (fixed by seed)
  data/<variant>/              synthesize stage work directories
  stand_alone/<variant>/<k>/   retrain stage work directories ('real' = ground truth)
  one_shot/<variant>/          supernet checkpoints (SPOS spaces)
  cells/...json                one finished cell each; a rerun skips them
  results.json, results.md, stand_alone.png, one_shot.png
"""
import os
import time
from typing import Dict, List, Sequence, Tuple

import jax
import ml_collections
import numpy as np
from absl import logging
from scipy import stats

from dfnas_jax import models, plots
from dfnas_jax import workdir as wd
from dfnas_jax.data import input_pipeline as ip
from dfnas_jax.data import nasbench201
from dfnas_jax.models import darts as darts_lib
from dfnas_jax.models import nb201
from dfnas_jax.nas import search_data, spos
from dfnas_jax.synthesis import synthesize
from dfnas_jax.train import retrain

REAL = 'real'
# Synthesis config overrides of each data variant: the default method (the generator)
# without one component each, and plain DeepInversion (per-image, none of the three).
VARIANTS = {
    'full': {},
    'no_rlc': {'label_calibration': False},
    'no_regional': {'regional_update': False},
    'deepinversion': {'method': 'inversion', 'label_calibration': False,
                      'regional_update': False, 'multi_resolution': False},
    'gaussian_noise': {'method': 'gaussian_noise'},
}
# Real-data controls of the one-shot ranking (NAS-Bench-201): a supernet trained
# with the teacher's soft labels on as many real images as a synthetic variant
# has, or on the whole real training split.
REAL_VARIANTS = ('real_same_count', 'real')
BENCHMARK_PROXY = 'nb201_12ep'  # the table's 12-epoch validation accuracy
VERSIONS = ('stand_alone', 'one_shot')


def variant_names(config) -> List[str]:
  names = [v.strip() for v in config.variants.split(',') if v.strip()]
  known = [*VARIANTS, *(REAL_VARIANTS if nb201.is_name(config.space) else ())]
  unknown = [v for v in names if v not in known]
  if unknown or not names:
    raise ValueError(f'variants={config.variants!r}: each must be one of {known}.')
  return names


def choose_architectures(space: spos.OneShotSpace, num_classes: int, count: int,
                         pool_size: int, flops_min: float, flops_max: float,
                         seed: int) -> List[spos.Arch]:
  """`count` distinct paths at evenly spaced FLOPs quantiles of a seeded pool.

  Spreading by FLOPs spreads the expected accuracies too, which is what a
  ranking can be tested on; K near-identical paths would rank by noise.
  """
  if not 2 <= count <= pool_size:
    raise ValueError(f'num_architectures must be in [2, pool_size={pool_size}], got {count}.')
  # Uniform paths: a seed's pool stays the one earlier studies drew.
  sampler = spos.PathSampler(space, num_classes, flops_min, flops_max, 'uniform')
  rng = np.random.default_rng(seed)
  pool = {sampler(rng) for _ in range(pool_size)}
  if len(pool) < count:
    raise ValueError(f'Only {len(pool)} distinct paths in a pool of {pool_size}; '
                     f'widen the FLOPs band or lower num_architectures.')
  ranked = sorted(pool, key=lambda a: (sampler.mflops(a), a))
  picks = np.unique(np.round(np.linspace(0, len(ranked) - 1, count)).astype(int))
  return [ranked[i] for i in picks]


def darts_architectures(count: int, pool_size: int, init_channels: int, layers: int,
                        seed: int) -> List[str]:
  """`count` distinct random DARTS networks, spread by their number of convolutions.

  Each genotype is derived, as the DARTS search derives its result, from
  architecture logits drawn from N(0, 1).
  """
  rng = np.random.default_rng(seed)
  shape = (darts_lib.NUM_EDGES, len(darts_lib.PRIMITIVES))
  pool = {darts_lib.derive_genotype({t: rng.normal(size=shape) for t in darts_lib.CELL_TYPES})
          for _ in range(pool_size)}
  if len(pool) < count:
    raise ValueError(f'Only {len(pool)} distinct genotypes in a pool of {pool_size}.')
  ranked = sorted(pool, key=lambda g: (darts_convolutions(g), str(g)))
  picks = np.unique(np.round(np.linspace(0, len(ranked) - 1, count)).astype(int))
  return [darts_lib.architecture_name(ranked[i], init_channels, layers) for i in picks]


def darts_convolutions(genotype) -> int:
  """Separable and dilated convolutions in the normal and reduction cells."""
  return sum(op.startswith(('sep_conv', 'dil_conv'))
             for op, _ in (*genotype.normal, *genotype.reduce))


def rank_statistics(scores: Sequence[float], truth: Sequence[float], num_bootstrap: int,
                    seed: int) -> Dict[str, float]:
  """Kendall's tau-b and Spearman's rho of `scores` against `truth`, bootstrap 95%
  intervals (architectures resampled with replacement), the top-10% precision (the
  share of the best tenth by `scores` that is in the best tenth by `truth`), and
  the top-1 regret: the best real accuracy minus that of the architecture `scores`
  rank first."""
  scores, truth = np.asarray(scores, float), np.asarray(truth, float)

  def correlations(idx):
    s, t = scores[idx], truth[idx]
    if np.ptp(s) == 0 or np.ptp(t) == 0:  # undefined for a constant ranking
      return np.nan, np.nan
    return stats.kendalltau(s, t).statistic, stats.spearmanr(s, t).statistic

  tau, rho = correlations(np.arange(len(scores)))
  rng = np.random.default_rng(seed)
  boot = np.array([correlations(rng.integers(len(scores), size=len(scores)))
                   for _ in range(num_bootstrap)])
  # A tie for the top is broken at random: its pick's expected real accuracy.
  picks = np.flatnonzero(scores == scores.max())
  top = max(1, round(0.1 * len(scores)))  # ties at the cut: stable order
  precision = len(set(np.argsort(-scores, kind='stable')[:top])
                  & set(np.argsort(-truth, kind='stable')[:top])) / top
  result = {'kendall_tau': float(tau), 'spearman_rho': float(rho),
            'top10_precision': float(precision), 'top1_index': int(picks[0]),
            'top1_ties': len(picks), 'top1_real_accuracy': float(truth[picks].mean()),
            'regret': float(truth.max() - truth[picks].mean())}
  for j, name in enumerate(('kendall_tau', 'spearman_rho')):
    low, high = (np.nanpercentile(boot[:, j], [2.5, 97.5]) if np.isfinite(boot[:, j]).any()
                 else (np.nan, np.nan))
    result[f'{name}_ci95'] = [float(low), float(high)]
  return result


class Study:
  """The table's cells, each computed once and saved under WORKDIR/cells."""

  def __init__(self, config, workdir: str):
    self.config, self.workdir = config, workdir
    self.variants = variant_names(config)
    self.space = None if config.space == 'darts' else spos.one_shot_space(config.space)
    self._data = search_data.reused_datasets(config, list(VARIANTS))
    self._real = None  # (the real training split, its labels), read once
    self._times: List[float] = []  # seconds per cell computed in this run, for the ETA

  def _cell_path(self, *parts) -> str:
    return os.path.join(self.workdir, 'cells', *parts[:-1], f'{parts[-1]}.json')

  def cell(self, parts: Sequence[str], compute, total: int, done: int):
    """The saved cell `parts`, or compute() saved there (process 0 writes)."""
    path = self._cell_path(*parts)
    if os.path.exists(path):
      logging.info('Cell %s reused: saved by an earlier run (%d/%d).', '/'.join(parts),
                   done + 1, total)
      return wd.read_json(path)
    start = time.time()
    value = compute()
    self._times.append(time.time() - start)
    if jax.process_index() == 0:
      wd.write_json(path, value)
    eta = np.mean(self._times) * (total - done - 1)
    logging.info('Cell %s done in %.0f s (%d/%d; ETA %.1f min at this run\'s pace).',
                 '/'.join(parts), self._times[-1], done + 1, total, eta / 60)
    return value

  def data(self, variant: str) -> str:
    """The synthetic dataset directory of `variant` (synthesized once, or reused)."""
    if variant not in self._data:
      sc = search_data.synthesis_config(self.config)
      sc.update(VARIANTS[variant])
      summary = synthesize.load_or_run(sc, os.path.join(self.workdir, 'data', variant))
      self._data[variant] = summary['dataset_dir']
    return self._data[variant]

  def train(self, variant: str, index: int, architecture: str) -> Dict[str, float]:
    """Trains one architecture from scratch on `variant` (or real data); real accuracy."""
    c = self.config
    rc = ml_collections.ConfigDict(c.train.to_dict())
    rc.update(stage='retrain', name=f'{variant}_{index}', architecture=architecture,
              teacher=c.teacher, teacher_checkpoint=c.teacher_checkpoint,
              soft_labels=c.soft_labels, download=c.download, eval_dataset=c.eval_dataset,
              eval_data_dir=c.eval_data_dir, eval_split=c.eval_split)
    source = None
    if variant in REAL_VARIANTS:
      rc.update(dataset=c.real_dataset, data_dir=c.real_data_dir,
                train_split=c.real_train_split, augment=c.real_augment)
      if variant == REAL:  # hard labels on the whole split
        rc.update(loss='cross_entropy')
      else:  # the synthetic sets' count of real images, distilled as they are
        whole, _, rows = self.real_rows(variant)
        source = ip.subset(whole, rows)
        rc.update(loss='distillation', soft_labels='teacher')
    else:
      rc.update(dataset=self.data(variant), data_dir=None, train_split='train',
                loss='distillation', augment=c.synthetic_augment)
    result = retrain.run(rc, os.path.join(self.workdir, 'stand_alone', variant, str(index)),
                         train_source=source)
    return {'accuracy': result['eval_accuracy'], 'train_s': round(result['wall_time_s'], 1)}

  def real_rows(self, variant: str) -> Tuple[ip.DataSource, np.ndarray, np.ndarray]:
    """(the whole real training split, its labels, the rows `variant` uses): every row for
    'real'; for 'real_same_count' as many as the synthetic sets hold, as evenly over the
    classes, random by seed."""
    c = self.config
    if self._real is None:
      whole = ip.get_source(c.real_dataset, c.real_train_split, c.real_data_dir, c.download,
                            fields='real_')
      self._real = whole, ip.read_column(whole, search_data.class_feature(whole))
    whole, labels = self._real
    rows = np.arange(len(labels))
    if variant == 'real_same_count':
      count = c.synthesis.images_per_round * c.synthesis.num_rounds
      rows = np.sort(search_data.class_balanced_rows(labels, c.seed, per_class=max(
          1, count // whole.num_classes))[1])
    return whole, labels, rows

  def num_images(self, variant: str) -> int:
    """How many images `variant` holds: real rows, or its synthetic dataset's."""
    if variant in REAL_VARIANTS:
      return len(self.real_rows(variant)[2])
    return ip.get_source(self.data(variant), 'train').num_examples

  def one_shot_sources(self, variant: str) -> Tuple[ip.DataSource, ip.DataSource]:
    """(supernet training, held-out) sources of `variant`: class-balanced, random by seed."""
    if variant in REAL_VARIANTS:
      whole, labels, rows = self.real_rows(variant)
    else:
      whole = ip.get_source(self.data(variant), 'train')
      labels = ip.read_column(whole, search_data.class_feature(whole))
      rows = np.arange(len(labels))
    train_rows, val_rows = search_data.class_balanced_rows(labels[rows], self.config.seed,
                                                           per_class=self.config.val_per_class)
    return ip.subset(whole, rows[train_rows]), ip.subset(whole, rows[val_rows])

  def one_shot(self, variant: str, archs: List[spos.Arch]) -> Dict[str, List[float]]:
    """Trains a supernet on `variant`; BN-recalibrated held-out accuracy of each arch."""
    c = ml_collections.ConfigDict(self.config.to_dict())
    train_source, val_source = self.one_shot_sources(variant)
    if variant in REAL_VARIANTS:  # real images carry no stored soft labels
      c.soft_labels, c.supernet.augment = 'teacher', c.real_augment
    model = models.build_model(c.space, train_source.num_classes, dropout=c.dropout)
    sampler = spos.PathSampler(self.space, train_source.num_classes, c.flops_min, c.flops_max,
                               c.path_sampling)
    teacher = retrain.distillation_teacher(c.supernet.loss, c)
    supernet = spos.train_supernet(c, os.path.join(self.workdir, 'one_shot', variant), model,
                                   train_source, sampler, teacher)
    start = time.time()
    evaluator = spos.subnet_evaluator(c, model, supernet['state'].variables, train_source,
                                      val_source)
    return {'accuracy': [evaluator(a) for a in archs], 'val_rows': list(val_source.rows),
            'num_images': train_source.num_examples + val_source.num_examples,
            'train_s': round(supernet['wall_time_s'] + time.time() - start, 1)}


def check_config(config) -> None:
  if config.space == 'darts':
    image_size = 32
    if config.one_shot:
      raise ValueError('The one-shot ranking needs a SPOS supernet: set one_shot=False for '
                       "space='darts'.")
  else:
    image_size = spos.one_shot_space(config.space).image_size
  for name in ('train', 'supernet'):
    if config[name].image_size != image_size:
      raise ValueError(f'Space {config.space!r} is for {image_size} px inputs but '
                       f'{name}.image_size is {config[name].image_size}.')
  if nb201.is_name(config.space):
    if not config.benchmark_table:
      raise ValueError('A NAS-Bench-201 study needs benchmark_table: the path of the '
                       "benchmark's results table (docs/nasbench201_table.md).")
    if not (config.stand_alone or config.one_shot):
      raise ValueError('Set stand_alone=True, one_shot=True or both: the study has nothing '
                       'to rank.')
  elif not config.stand_alone:
    raise ValueError('The ground truth of a SPOS or DARTS study is stand-alone training on '
                     'real data: set stand_alone=True.')
  elif config.stand_alone_architectures > 0:
    raise ValueError('stand_alone_architectures is for NAS-Bench-201 studies: a SPOS or DARTS '
                     'study trains all K architectures (their ground truth); set it to 0.')
  if config.stand_alone and not config.eval_dataset:
    raise ValueError('eval_dataset must name the real held-out data every ranking is scored on.')
  retrain.check_soft_labels(config)
  stored = config.soft_labels == 'stored'
  if config.one_shot:
    search_data.check_synthesis(search_data.synthesis_config(config), stored,
                                config.supernet.augment, config.supernet.image_size,
                                per_class=config.val_per_class)
  if config.stand_alone:
    search_data.check_synthesis(search_data.synthesis_config(config), stored,
                                config.synthetic_augment, config.train.image_size)
  variant_names(config)
  search_data.reused_datasets(config, list(VARIANTS))


def run(config: ml_collections.ConfigDict, workdir: str):
  start = time.time()
  check_config(config)
  study = Study(config, workdir)
  variants = study.variants
  table = nasbench201.load(config.benchmark_table) if nb201.is_name(config.space) else None
  truth = proxy = None
  if table is not None:  # the table's networks classify CIFAR-10
    rows = table.sample(config.num_architectures, config.seed)
    archs = [table.archs[r] for r in rows]
    names = [study.space.architecture_name(a) for a in archs]
    sizes = [study.space.cost(a, 10)[0] / 1e6 for a in archs]
    truth = [float(table.test_accuracy[r]) / 100 for r in rows]
    proxy = [float(table.valid_accuracy_12ep[r]) / 100 for r in rows]
  elif study.space is None:
    names = darts_architectures(config.num_architectures, config.pool_size,
                                config.darts_channels, config.darts_layers, config.seed)
    archs, sizes = names, [darts_convolutions(darts_lib.parse_name(n)['genotype'])
                           for n in names]
  else:
    num_classes = ip.get_source(config.eval_dataset, config.eval_split, config.eval_data_dir,
                                config.download, fields='eval_').num_classes
    archs = choose_architectures(study.space, num_classes, config.num_architectures,
                                 config.pool_size, config.flops_min, config.flops_max,
                                 config.seed)
    names = [study.space.architecture_name(a) for a in archs]
    sizes = [study.space.cost(a, num_classes)[0] / 1e6 for a in archs]
  size_unit = 'convolutions' if study.space is None else 'MFLOPs'
  arch_path = os.path.join(workdir, 'architectures.json')
  if os.path.exists(arch_path):  # finished cells belong to these architectures
    if wd.read_json(arch_path)['architectures'] != names:
      raise ValueError(f'{workdir} holds a study of other architectures ({arch_path}); the '
                       'seed, space, FLOPs band or count changed. Use a new work directory.')
  elif jax.process_index() == 0:
    wd.write_json(arch_path, {'space': config.space, 'architectures': names})
  logging.info('Architectures:\n%s', '\n'.join(
      f'  {i}: {n} ({c:g} {size_unit})' for i, (n, c) in enumerate(zip(names, sizes))))

  # Data first, then architecture by architecture: all variants of one architecture
  # share its compiled distillation step (through the persistent compilation cache).
  for v in variants:
    if v in VARIANTS:
      study.data(v)
  # Stand-alone rows: real data (hard labels), each synthetic variant and, on
  # NAS-Bench-201, 'real_same_count' (as many real images, distilled the same way).
  trained = [REAL] + [v for v in variants if v in VARIANTS or v == 'real_same_count']
  num_trained = len(archs)
  if config.stand_alone_architectures > 0:  # NAS-Bench-201 only (check_config)
    num_trained = min(config.stand_alone_architectures, len(archs))
  total = ((num_trained * len(trained)) if config.stand_alone else 0) + (
      len(variants) if config.one_shot else 0)
  done = 0
  stand_alone = {}
  if config.stand_alone:
    stand_alone = {v: [None] * num_trained for v in trained}
    for i, name in enumerate(names[:num_trained]):
      for v in trained:
        stand_alone[v][i] = study.cell(('stand_alone', v, str(i)),
                                       lambda: study.train(v, i, name), total, done)['accuracy']
        done += 1
    if table is None:
      truth = stand_alone.pop(REAL)
  one_shot = {}
  if config.one_shot:
    for v in variants:
      one_shot[v] = study.cell(('one_shot', v), lambda: study.one_shot(v, archs), total, done)
      done += 1

  scores = {'stand_alone': stand_alone, 'one_shot': {v: c['accuracy'] for v, c in one_shot.items()}}
  if proxy is not None:
    scores['reference'] = {BENCHMARK_PROXY: proxy}
  # A stand-alone row may cover only the first cells: it is scored on those.
  table_stats = {version: {v: rank_statistics(s, truth[:len(s)], config.num_bootstrap,
                                              config.seed)
                           for v, s in per_variant.items()}
                 for version, per_variant in scores.items() if per_variant}
  if config.stand_alone and config.one_shot and num_trained < len(archs):
    table_stats['one_shot_same_cells'] = {
        v: rank_statistics(s[:num_trained], truth[:num_trained], config.num_bootstrap,
                           config.seed) for v, s in scores['one_shot'].items()}
  ground_truth = ('NAS-Bench-201 CIFAR-10 test accuracy, 200 epochs' if table is not None
                  else f'{config.real_dataset} {config.real_train_split}, stand-alone')
  num_images = {v: one_shot[v]['num_images'] if 'num_images' in one_shot.get(v, {})
                else study.num_images(v) for v in variants}
  results = {
      'stage': 'rank_correlation', 'space': config.space, 'architectures': names,
      'size': sizes, 'size_unit': size_unit, 'ground_truth': ground_truth,
      'real_accuracy': truth, 'scores': scores, 'statistics': table_stats,
      'num_images': num_images,
      'eval_data': f'{config.eval_dataset} {config.eval_split}' if config.stand_alone else None,
      'real_train_data': f'{config.real_dataset} {config.real_train_split}',
      'stand_alone_architectures': num_trained if config.stand_alone else 0,
      'train_steps': config.train.num_train_steps,
      'supernet_steps': config.supernet.num_train_steps,
      'wall_time_s': round(time.time() - start, 1),
  }
  if table is not None:
    results.update(benchmark_table=table.path, benchmark_strings=[
        nb201.arch_to_string(a) for a in archs], benchmark_indices=[
        int(table.indices[r]) for r in rows], benchmark_best_test_accuracy=float(
        table.test_accuracy[table.best()]) / 100)
  if jax.process_index() == 0:
    wd.write_json(os.path.join(workdir, 'results.json'), results)
    wd.atomic_write_bytes(os.path.join(workdir, 'results.md'), markdown(results).encode())
    y_labels = {'stand_alone': 'accuracy on real held-out', 'reference': 'table accuracy',
                'one_shot': 'supernet accuracy (own held-out)'}
    for version, per_variant in scores.items():
      if per_variant:
        panels = {v: (np.asarray(truth[:len(s)]), np.asarray(s),
                      f"tau {table_stats[version][v]['kendall_tau']:.2f}")
                  for v, s in per_variant.items()}
        plots.rank_scatter(panels, ground_truth, y_labels[version],
                           os.path.join(workdir, f'{version}.png'),
                           labels=[str(i) for i in range(len(archs))] if len(archs) <= 20
                           else ())
  summary = {k: results[k] for k in ('stage', 'space', 'architectures', 'wall_time_s')}
  summary['kendall_tau'] = {version: {v: s['kendall_tau'] for v, s in per.items()}
                            for version, per in table_stats.items()}
  wd.write_summary(workdir, summary)
  return summary


def _interval(stat: Dict[str, float], name: str) -> str:
  low, high = stat[f'{name}_ci95']
  if not np.isfinite(stat[name]):
    return 'undefined (a constant ranking)'
  return f'{stat[name]:+.2f} [{low:+.2f}, {high:+.2f}]'


def _pick(stat: Dict[str, float]) -> str:
  ties = stat.get('top1_ties', 1)
  return str(stat['top1_index']) if ties == 1 else f'a {ties}-way tie'


def markdown(results: Dict) -> str:
  """The report's tables: rank agreement per variant, then accuracies per architecture."""
  lines = ['| version | data | Kendall tau [95% CI] | Spearman rho [95% CI] | top-10% precision '
           '| top-1 pick | its true acc. | regret |', '|---|---|---|---|---|---|---|---|']
  for version, per_variant in results['statistics'].items():
    for v, s in per_variant.items():
      lines.append(f"| {version} | {v} | {_interval(s, 'kendall_tau')} | "
                   f"{_interval(s, 'spearman_rho')} | {s['top10_precision']:.2f} | {_pick(s)} | "
                   f"{100 * s['top1_real_accuracy']:.1f}% | {100 * s['regret']:.1f} pt |")
  abbreviation = {'stand_alone': 's.a.', 'one_shot': 'o.s.', 'reference': 'ref.'}
  columns = [(f'{v} ({abbreviation[version]})', s)
             for version, per_variant in results['scores'].items()
             for v, s in per_variant.items()]
  header = ['#', 'architecture', results['size_unit'], 'truth'] + [c for c, _ in columns]
  lines += ['', f"Truth: {results.get('ground_truth', 'real data')}.", '',
            '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for i, name in enumerate(results['architectures']):
    row = [str(i), f'`{name}`', f"{results['size'][i]:g}",
           f"{100 * results['real_accuracy'][i]:.1f}"]
    row += [f'{100 * s[i]:.1f}' if i < len(s) else '' for _, s in columns]
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines) + '\n'
